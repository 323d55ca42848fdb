"""Decode attention that reads KV blocks in place: the GPU's kernel, and the PyTorch reference it is tested against.

In:  query [B, H, Dk], K and V pools [num_blocks, block_size, G, Dk|Dv] (MLA: V is None and the values are
     the first `value_dim` entries of each key), block tables [B, n], positions [B], softmax scale,
     sliding window (None = full), sinks [H] (None = plain softmax).
Out: [B, H, Dv].

`runs_paged_kernel(device)` says where the Triton kernel (layers/paged_attention_triton.py) runs: CUDA with
triton installed. Elsewhere attention gathers blocks into a workspace and uses torch's SDPA
(layers/attention.py), which this module's reference mirrors row by row in float32.
"""

from __future__ import annotations

import importlib.util

import torch

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def runs_paged_kernel(device: torch.device) -> bool:
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
    from moeserve.layers.paged_attention_triton import paged_decode  # triton is imported only where it runs

    values = k_pool if v_pool is None else v_pool
    value_dim = value_dim or values.shape[-1]
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
