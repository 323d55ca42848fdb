"""Paged decode attention on the CPU (the C++ kernel in moeserve._cpu_gemm, csrc/cpu_attention.cpp) as a torch op.

In:  query [B, H, Dk]; K pool [num_blocks, block_size, G, Dk] and V pool [num_blocks, block_size, G, Dv]
     (None: the values are the keys' first `value_dim` entries, as MLA's latents), each entry's Dk (Dv) values
     contiguous; block tables [B, n] and positions [B] long; the softmax scale; a sliding window (None: the
     whole context); sinks [H] (None: a plain softmax). Query and pools float32, or all bfloat16.
Out: [B, H, Dv] in the query's dtype: each row over its positions max(0, p - window + 1)..p, read in place
     through its table (the K/V of position p written already).

Why: on a CPU the gather-then-SDPA path (layers/attention.py) copies every block a step reads and pays SDPA's
set-up per layer (buffers, transposes): ~11 us a layer on the embedded model, a tenth of its decode step,
for a few thousand multiply-adds. The kernel reads the blocks where they are.

Arithmetic (csrc/cpu_attention.h): float32, one fixed order on every instruction set, each (row, head) on its
own, so a row's result depends neither on the vector width, nor on the thread count, nor on the other rows
of the step. It is not SDPA's order: the two agree to float32 rounding (layers/paged_attention.py's
reference is the yardstick of the tests).

Under torch.compile it runs as moeserve::cpu_paged_decode (a fake gives its shape), or its C++ twin in
moeserve_native once native_ops.load() has built them, so a compiled step calls the kernel without going
back into Python; eager calls skip the op dispatch and call the extension directly. Which instruction set
runs follows layers/cpu_gemm.py's choice (MOESERVE_CPU_ISA, `set_isa`).
"""

from __future__ import annotations

import torch

from moeserve import native_ops
from moeserve.layers import cpu_gemm

# one extension holds the CPU GEMM and this kernel, with one set of dtype codes
_ext, _DTYPE_CODES = cpu_gemm._ext, cpu_gemm._DTYPE_CODES


def available(dtype: torch.dtype) -> bool:
    """Whether the kernel runs for a KV cache of `dtype`: the extension is built and takes the dtype (the GEMM's
    condition: both kernels take the same dtypes)."""
    return cpu_gemm.available(dtype)


def entry_address() -> int | None:
    """The address of the kernel's C entry point (for moeserve.native_ops' C++ ops); None when not built."""
    return None if _ext is None else _ext.attention_entry_address()


def paged_decode(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor | None,
    tables: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None,
    value_dim: int,
) -> torch.Tensor:
    """[B, H, value_dim] attention of each query row over its cached positions (see the module docstring).
    A ValueError names what does not fit."""
    _check(query, k_pool, v_pool, tables, positions, value_dim)
    window = 0 if window is None else int(window)
    if torch.compiler.is_compiling():
        return native_ops.ops().cpu_paged_decode(query, k_pool, v_pool, tables, positions, scale, window, sinks, value_dim)
    return _run(query, k_pool, v_pool, tables, positions, scale, window, sinks, value_dim)


def _check(query, k_pool, v_pool, tables, positions, value_dim) -> None:
    pools = [k_pool] if v_pool is None else [k_pool, v_pool]
    if not available(query.dtype) or any(p.dtype != query.dtype for p in pools):
        why = "the extension is not built" if _ext is None else (
            f"it takes float32 or bfloat16 query and pools of one dtype, got {query.dtype} and "
            f"{[str(p.dtype) for p in pools]}")
        raise ValueError(f"the CPU paged attention cannot run: {why}.")
    if query.dim() != 3 or any(p.dim() != 4 for p in pools) or tables.dim() != 2 or positions.dim() != 1:
        raise ValueError(
            f"the CPU paged attention needs query [B, H, Dk], pools [blocks, block_size, G, D], tables [B, n] and "
            f"positions [B], got {tuple(query.shape)}, {[tuple(p.shape) for p in pools]}, {tuple(tables.shape)} and "
            f"{tuple(positions.shape)}.")
    batch, heads, key_dim = query.shape
    num_blocks, block_size, kv_heads, pool_key_dim = k_pool.shape
    if pool_key_dim != key_dim or heads % kv_heads != 0:
        raise ValueError(f"the CPU paged attention: query {tuple(query.shape)} does not fit the K pool "
                         f"{tuple(k_pool.shape)} (same head size, query heads a multiple of the KV heads).")
    if v_pool is not None and (v_pool.shape[:3] != k_pool.shape[:3] or v_pool.shape[3] != value_dim):
        raise ValueError(f"the CPU paged attention: the V pool {tuple(v_pool.shape)} does not match the K pool "
                         f"{tuple(k_pool.shape)} and value size {value_dim}.")
    if v_pool is None and not 0 < value_dim <= key_dim:
        raise ValueError(f"the CPU paged attention: values read from the keys need 0 < value_dim <= {key_dim}, "
                         f"got {value_dim}.")
    if tables.shape[0] != batch or positions.shape[0] != batch or tables.dtype != torch.long or positions.dtype != torch.long:
        raise ValueError(f"the CPU paged attention needs long tables and positions with one row per query row ({batch}), "
                         f"got {tables.dtype} {tuple(tables.shape)} and {positions.dtype} {tuple(positions.shape)}.")
    if any(p.stride(3) != 1 for p in pools):
        raise ValueError("the CPU paged attention needs each pool entry's values contiguous (the last stride 1).")
    devices = {t.device.type for t in (query, tables, positions, *pools)}
    if devices != {"cpu"}:
        raise ValueError(f"the CPU paged attention needs every tensor on the CPU, got {sorted(devices)}.")


def _run(query, k_pool, v_pool, tables, positions, scale, window, sinks, value_dim) -> torch.Tensor:
    query, tables, positions = query.contiguous(), tables.contiguous(), positions.contiguous()
    sinks = None if sinks is None else sinks.detach().to(torch.float32).contiguous()
    batch, heads, key_dim = query.shape
    num_blocks, block_size, kv_heads, _ = k_pool.shape
    values = k_pool if v_pool is None else v_pool
    out = torch.empty(batch, heads, value_dim, dtype=query.dtype)
    _ext.paged_decode(
        _DTYPE_CODES[query.dtype], query.data_ptr(), batch, heads, key_dim, k_pool.data_ptr(),
        0 if v_pool is None else v_pool.data_ptr(), num_blocks, block_size, kv_heads, value_dim,
        list(k_pool.stride()[:3]), list(values.stride()[:3]), tables.data_ptr(), tables.shape[1], tables.stride(0),
        positions.data_ptr(), float(scale), window, 0 if sinks is None else sinks.data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


# The op torch.compile sees (inductor calls it as an extern kernel), a plain CPU kernel of a library fragment
# as layers/cpu_gemm.py's ops are.
_library = torch.library.Library("moeserve", "FRAGMENT")
_library.define(
    "cpu_paged_decode(Tensor query, Tensor k_pool, Tensor? v_pool, Tensor tables, Tensor positions, float scale, "
    "int window, Tensor? sinks, int value_dim) -> Tensor"
)


def _paged_decode_op(query, k_pool, v_pool, tables, positions, scale, window, sinks, value_dim) -> torch.Tensor:
    _check(query, k_pool, v_pool, tables, positions, value_dim)
    return _run(query, k_pool, v_pool, tables, positions, scale, window, sinks, value_dim)


_library.impl("cpu_paged_decode", _paged_decode_op, "CPU")
torch.library.register_fake(
    "moeserve::cpu_paged_decode",
    lambda query, k_pool, v_pool, tables, positions, scale, window, sinks, value_dim: query.new_empty(
        query.shape[0], query.shape[1], value_dim
    ),
    lib=_library,
)
