"""Decode attention that reads KV blocks in place: the GPU's and the CPU's kernels, and the PyTorch reference they
are tested against.

In:  query [B, H, Dk], K and V pools [num_blocks, block_size, G, Dk|Dv] (MLA: V is None and the values are
     the first `value_dim` entries of each key), block tables [B, n], positions [B], softmax scale,
     sliding window (None = full), sinks [H] (None = plain softmax).
Out: [B, H, Dv].

`runs_paged_kernel(device, dtype)` says where a kernel runs: the Triton kernel (layers/paged_attention_triton.py)
on CUDA with triton installed, the C++ kernel (layers/cpu_attention.py) on a CPU for a float32 or bfloat16 KV
cache once the extension is built. Elsewhere attention gathers blocks into a workspace and uses torch's SDPA
(layers/attention.py), which this module's reference mirrors row by row in float32.
"""

from __future__ import annotations

import importlib.util

import torch

from moeserve.layers import cpu_attention

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def runs_paged_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode attention on `device` over a KV cache of `dtype` runs a kernel that reads blocks in place."""
    if device.type == "cpu":
        return cpu_attention.available(dtype)
    return device.type == "cuda" and _TRITON_INSTALLED


def paged_decode_attention(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor | None,
    tables: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None,
    value_dim: int | None = None,
) -> torch.Tensor:
    values = k_pool if v_pool is None else v_pool
    value_dim = value_dim or values.shape[-1]
    if query.device.type == "cpu":
        return cpu_attention.paged_decode(query, k_pool, v_pool, tables, positions, scale, window, sinks, value_dim)
    return triton_paged_decode(query, k_pool, values, tables, positions, scale, window, sinks, value_dim)


def triton_paged_decode(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None,
    value_dim: int,
) -> torch.Tensor:
    """The Triton kernel wherever triton runs (CUDA; a CPU under TRITON_INTERPRET=1): `values` is the V pool,
    or the K pool itself for MLA."""
    from moeserve.layers.paged_attention_triton import paged_decode  # triton is imported only where it runs

    out = query.new_empty(query.shape[0], query.shape[1], value_dim)  # [B, H, Dv]
    return paged_decode(query, k_pool, values, tables, positions, scale, window, sinks, value_dim, out)


def paged_decode_reference(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor | None,
    tables: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None,
    value_dim: int | None = None,
) -> torch.Tensor:
    """The same result computed plainly, one sequence at a time, in float32."""
    values_pool = k_pool if v_pool is None else v_pool
    value_dim = value_dim or values_pool.shape[-1]
    B, H, _ = query.shape
    G, size = k_pool.shape[2], k_pool.shape[1]
    out = torch.empty(B, H, value_dim, dtype=query.dtype, device=query.device)
    for b in range(B):
        position = int(positions[b])
        blocks = tables[b, : position // size + 1]
        keys = k_pool[blocks].reshape(-1, G, k_pool.shape[-1])[: position + 1].float()  # [L, G, Dk]
        values = values_pool[blocks].reshape(-1, G, values_pool.shape[-1])[: position + 1, :, :value_dim].float()
        first = 0 if window is None else max(0, position - window + 1)
        keys, values = keys[first:], values[first:]
        for h in range(H):
            g = h // (H // G)
            scores = keys[:, g] @ query[b, h].float() * scale  # [L]
            if sinks is not None:
                scores = torch.cat((scores, sinks[h].float().reshape(1)))
            probs = torch.softmax(scores, dim=0)[: keys.shape[0]]
            out[b, h] = (probs @ values[:, g]).to(query.dtype)
    return out
