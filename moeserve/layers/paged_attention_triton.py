"""The Triton kernel behind paged_decode_attention: one new query per sequence over its KV blocks, in place.

In:  query [B, H, Dk]; a K pool [num_blocks, block_size, G, Dk] and a V pool (any strides; MLA passes the
     K pool again with value_dim = its latent rank); block tables [B, n]; positions [B] (each query's own
     position: it sees keys 0..position, or the last `window` of them); optional sinks [H] (float32 logits
     that join every softmax and are then dropped, gpt_oss).
Out: out [B, H, Dv] in the query's dtype.

Design. Program (b, h) walks only the blocks its own sequence needs, from the first its window reaches
to the one holding its position, reading each block of K and V once through the table (no gather, no
workspace), with an online softmax in float32 (running max and sum, rescaled per block). Loop bounds
come from the device's positions, so the launch needs no host sync and replays inside CUDA graphs
with tables and positions as static inputs. Heads of one GQA group read the same blocks; on a GPU the
second read hits L2. float32 dots use input_precision="ieee" (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, pos_ptr, sinks_ptr, out_ptr,
    scale, window,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kg,
    stride_vb, stride_vt, stride_vg,
    stride_tb,
    stride_ob, stride_oh,
    HEADS_PER_GROUP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = h // HEADS_PER_GROUP
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    tok = tl.arange(0, BLOCK_SIZE)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + dk, mask=dk < DK, other=0.0).to(tl.float32)  # [BLOCK_DK]
    position = tl.load(pos_ptr + b)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(position - window + 1, 0) // BLOCK_SIZE
    last = position // BLOCK_SIZE
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    for j in range(first, last + 1):
        block = tl.load(tables_ptr + b * stride_tb + j).to(tl.int64)
        key_pos = j * BLOCK_SIZE + tok  # [BLOCK_SIZE]
        visible = key_pos <= position
        if HAS_WINDOW:
            visible = visible & (key_pos > position - window)
        k_rows = k_ptr + block * stride_kb + tok[:, None] * stride_kt + g * stride_kg + dk[None, :]
        keys = tl.load(k_rows, mask=dk[None, :] < DK, other=0.0).to(tl.float32)  # [BLOCK_SIZE, BLOCK_DK]
        scores = tl.sum(keys * q[None, :], axis=1) * scale  # [BLOCK_SIZE]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        rescale = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max)  # [BLOCK_SIZE], 0 where not visible
        v_rows = v_ptr + block * stride_vb + tok[:, None] * stride_vt + g * stride_vg + dv[None, :]
        values = tl.load(v_rows, mask=dv[None, :] < DV, other=0.0).to(tl.float32)  # [BLOCK_SIZE, BLOCK_DV]
        acc = acc * rescale + tl.sum(weights[:, None] * values, axis=0)
        running_sum = running_sum * rescale + tl.sum(weights, axis=0)
        running_max = new_max
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32)
        new_max = tl.maximum(running_max, sink)
        rescale = tl.exp(running_max - new_max)
        acc = acc * rescale
        running_sum = running_sum * rescale + tl.exp(sink - new_max)
    out = acc / running_sum
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)


def paged_decode(
    query: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None,
    value_dim: int,
    out: torch.Tensor,
) -> torch.Tensor:
    B, H, Dk = query.shape
    G = k_pool.shape[2]
    for name, t in (("query", query), ("k_pool", k_pool), ("v_pool", v_pool)):
        if t.stride(-1) != 1:
            raise ValueError(f"paged_decode needs {name} contiguous in its last dimension")
    _paged_decode_kernel[(B, H)](
        query, k_pool, v_pool, tables, positions, sinks if sinks is not None else query, out,
        scale, window or 0,
        query.stride(0), query.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        tables.stride(0),
        out.stride(0), out.stride(1),
        HEADS_PER_GROUP=H // G,
        DK=Dk, DV=value_dim, BLOCK_DK=triton.next_power_of_2(Dk), BLOCK_DV=triton.next_power_of_2(value_dim),
        BLOCK_SIZE=k_pool.shape[1], HAS_WINDOW=window is not None, HAS_SINKS=sinks is not None,
        enable_fp_fusion=False,  # as grouped_gemm_triton.py's launch says why
    )
    return out
