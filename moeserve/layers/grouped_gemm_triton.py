"""The Triton kernel behind grouped_gemm: one launch over blocks of slot-sorted pairs × blocks of N.

In:  a [R, Kdim]; rows [P] (the row of a each pair reads); weights [S, N, Kdim] (slot stride arbitrary,
     each [N, Kdim] contiguous); out [P, N] (any strides); an Alignment of the pairs' slots (block_m pairs
     of one slot per block, padding = P, padded_total on the device).
Out: out[p] = a[rows[p]] @ weights[slot of p].T, float32 accumulation, stored in out's dtype.

Design. Program (m, n) takes block m of the sorted pairs (block_m pairs of one slot) and columns
n*BLOCK_N.. of the output. It loads padded_total first and returns when its block is past it, so the
grid can be sized from P alone (no host sync) and padding blocks cost one load. It then walks Kdim in
BLOCK_K steps: a [block_m, BLOCK_K] tile of gathered activation rows (padding rows masked to zero) and a
[BLOCK_K, BLOCK_N] tile of the slot's weights, read once for all block_m pairs, so at batch > 1 an
expert's weights cross memory once per step however many tokens chose it.

Tile sizes. Decode has few pairs per slot, so the weights dominate the bytes read: block_m is the
smallest tensor-core tile (16) and BLOCK_N is the largest of 128/64/32 that still gives every slot
>= 256 column blocks (else 16), enough programs in flight to stream the weights at the memory bandwidth (an H100 or
H200 has 132 SMs, and a decode step uses only a few slots). BLOCK_K = 128 keeps each weight tile load
long and contiguous (Kdim is the weights' contiguous axis); float32 takes 32, as its IEEE dot runs on
the FMA units and holds more registers. None of these sizes depends on P: a pair's sum over Kdim is the
same chunks added in the same order whatever else is in the call (row independence), and no split-K.
float32 inputs use input_precision="ieee" (no TF32), matching F.linear under torch's default. The
interpreter multiplies bfloat16 tiles as their raw uint16 bits (triton 3.9), so there bfloat16 tiles are
widened to float32 first: exact, and what its float16 dot does anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.layers.grouped_gemm import Alignment

# Read once, as triton.jit decides at this module's import whether the kernel runs interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MIN_COLUMN_BLOCKS = 256  # column blocks per slot wanted for the weights to stream at full bandwidth


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def tile_config(n_out: int, k_dim: int, dtype: torch.dtype) -> TileConfig:
    """Tile sizes from the matrix shape and dtype alone (never from the number of pairs)."""
    block_n = next((b for b in (128, 64, 32) if triton.cdiv(n_out, b) >= MIN_COLUMN_BLOCKS), 16)
    block_k = min(32 if dtype == torch.float32 else 128, max(16, triton.next_power_of_2(k_dim)))
    return TileConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=2 if dtype == torch.float32 else 4)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, rows_ptr, sorted_pairs_ptr, block_slot_ptr, padded_total_ptr,
    num_pairs, n_out, k_dim,
    stride_a_row, stride_a_k, stride_w_slot, stride_w_n, stride_out_row, stride_out_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(padded_total_ptr):
        return
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    is_pair = pairs < num_pairs
    a_rows = tl.load(rows_ptr + pairs, mask=is_pair, other=0)  # [BLOCK_M] int64
    slot = tl.load(block_slot_ptr + pid_m)  # int64: slot offsets can pass 2**31 elements
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    is_col = cols < n_out
    ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    a_ptrs = a_ptr + a_rows[:, None] * stride_a_row + ks[None, :] * stride_a_k  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + slot * stride_w_slot + cols[None, :] * stride_w_n + ks[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        in_k = ks < k_dim - k0
        a_tile = tl.load(a_ptrs, mask=is_pair[:, None] & in_k[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=in_k[:, None] & is_col[None, :], other=0.0)
        if DOT_IN_FP32:
            acc = tl.dot(a_tile.to(tl.float32), w_tile.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a_tile, w_tile, acc)
        a_ptrs += BLOCK_K * stride_a_k
        w_ptrs += BLOCK_K
    out_ptrs = out_ptr + pairs[:, None] * stride_out_row + cols[None, :] * stride_out_n
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=is_pair[:, None] & is_col[None, :])


def launch(a: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, alignment: Alignment) -> None:
    """Fill out [P, N] (shapes already checked by grouped_gemm) with one kernel launch."""
    if not a.is_cuda and not INTERPRETED:
        raise ValueError(
            "grouped_gemm's Triton path runs CPU tensors only under TRITON_INTERPRET=1; set it before triton is imported."
        )
    if alignment.block_m < 16 or alignment.block_m & (alignment.block_m - 1):
        raise ValueError(
            f"grouped_gemm's Triton path needs block_m a power of two >= 16 (a tensor-core tile), got {alignment.block_m}."
        )
    _, n_out, k_dim = weights.shape
    config = tile_config(n_out, k_dim, a.dtype)
    grid = (alignment.max_blocks, triton.cdiv(n_out, config.block_n))
    _grouped_gemm_kernel[grid](
        a, weights, out, rows, alignment.sorted_pairs, alignment.block_slot, alignment.padded_total,
        alignment.num_pairs, n_out, k_dim,
        a.stride(0), a.stride(1), weights.stride(0), weights.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=alignment.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_IN_FP32=a.dtype == torch.float32 or (INTERPRETED and a.dtype == torch.bfloat16),
        num_warps=config.num_warps, num_stages=config.num_stages,
        # each multiply and add rounded on its own, as the CPU kernels (-ffp-contract=off); said explicitly, because
        # triton's default is changing (3.9 warns, 3.10 turns fusion off), which would move the bits silently
        enable_fp_fusion=False,
    )
