"""Gathered grouped GEMM: every (row, slot) pair multiplies one activation row by one expert slot's matrix.

In:  activations a [R, Kdim]; per pair p = 0..P-1 the row it reads (rows [P]) and the slot it uses
     (slots [P]), both long tensors on a's device; weights [S, N, Kdim], one matrix per slot, possibly
     a strided view (experts.expert_rows: slot stride experts.expert_row_numel, inner dims contiguous), in
     a's dtype, or in bfloat16 under float32 a on the CPU kernel's path (an expert cache's bfloat16 slots,
     offload/cache.py).
Out: [P, N] in a's dtype, out[p] = a[rows[p]] @ weights[slots[p]].T accumulated in float32 (as F.linear).

Nothing here reads a tensor's values on the host or makes a shape that depends on them, so the MoE block
can run it from device-side expert ids inside CUDA-graph capture and torch.compile(fullgraph=True).

Three paths with the same semantics:
- CUDA tensors, with triton installed: align_pairs groups the pairs by slot into blocks of block_m, then one
  Triton launch (grouped_gemm_triton.py) reads each slot's weight tile once per block of pairs.
- CPU tensors in float32 or bfloat16, with the C++ extension built: the CPU kernel (cpu_gemm.py), which groups
  the pairs by slot itself and sums every output in one fixed order on every instruction set.
- Anything else (float16 on a CPU, a GPU without triton): a gather and a batched matmul (torch.bmm,
  `reference_grouped_gemm`), the reference both kernels are checked against.

Row independence: the result for pair p does not depend on which other pairs share the call, bit for bit,
on every path. An offloaded provider that runs a layer's experts in several calls as they arrive thus
equals the resident single call. The Triton kernel keeps it by taking every tile size from (N, Kdim, dtype)
and block_m only, never from P, and by never splitting the Kdim reduction across programs; the CPU kernel
by summing each output alone over the whole Kdim in its fixed order (whatever the tiles and threads), so
its `grouped_linear` over one expert equals the same rows among a whole layer's pairs, too.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from moeserve.layers import cpu_gemm

# Legend: P = pairs, S = slots, R = activation rows, N = output features, Kdim = input features.

DEFAULT_BLOCK_M = 16  # pairs per program: the smallest tensor-core tile, so decode (few pairs per slot) pads least

# Steps of at most this many tokens (every decode step a CUDA graph holds, short extends) compute MoE experts
# with a grouped GEMM kernel (layers/moe.py), and dense layers.linear.Linear layers on a CPU with the CPU
# kernel; longer ones (prefill) with torch's matmuls, which read a big step's weights once where the kernels
# read them once per few rows.
GROUPED_GEMM_MAX_TOKENS = 64

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def runs_kernel(device: torch.device) -> bool:
    """Whether grouped_gemm on `device` runs the Triton kernel (GPU only: what align_pairs' grouping and
    CUDA-graph capture are for). On a GPU without triton the reference would copy each pair's whole weight
    matrix ([P, N, Kdim]), so callers keep it for tests."""
    return device.type == "cuda" and _TRITON_INSTALLED


def runs_cpu_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_gemm on `device` in `dtype` runs the CPU kernel (cpu_gemm.py: float32 and bfloat16,
    once the extension is built)."""
    return device.type == "cpu" and cpu_gemm.available(dtype)


def has_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_gemm on `device` in `dtype` runs a kernel (Triton or CPU) rather than the reference:
    the MoE block then computes small steps' experts through it, on every path (layers/moe.py)."""
    return runs_kernel(device) or runs_cpu_kernel(device, dtype)


@dataclass(frozen=True)
class Alignment:
    """Pairs grouped by slot, each group padded to a multiple of block_m; fixed sizes, device tensors.

    sorted_pairs [max_blocks * block_m]: pair indices, slot by slot in ascending slot order, each slot's
        pairs in ascending pair order; padding (inside a group and after the last one) holds num_pairs.
    block_slot [max_blocks]: the slot every block of block_m entries of sorted_pairs belongs to; blocks at
        or past padded_total hold num_slots (no slot: the kernel stops before reading them).
    padded_total [1]: how many entries of sorted_pairs the groups fill (a multiple of block_m).
    """

    sorted_pairs: torch.Tensor
    block_slot: torch.Tensor
    padded_total: torch.Tensor
    num_pairs: int
    num_slots: int
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_slot.shape[0]


def max_padded_pairs(num_pairs: int, num_slots: int, block_m: int) -> int:
    """The most entries the padded groups can fill: each used slot (at most min(P, S)) pads at most
    block_m - 1, and the total is a multiple of block_m, so it rounds down to one."""
    return (num_pairs + min(num_pairs, num_slots) * (block_m - 1)) // block_m * block_m


def align_pairs(slots: torch.Tensor, num_slots: int, block_m: int = DEFAULT_BLOCK_M) -> Alignment:
    """slots [P] long → the Alignment of its pairs. Sync-free, with shapes that depend only on
    (P, num_slots, block_m), so it compiles with fullgraph=True and runs inside CUDA-graph capture."""
    if slots.dim() != 1 or slots.dtype != torch.long:
        raise ValueError(f"align_pairs needs slots as a 1-D long tensor, got {slots.dtype} of shape {tuple(slots.shape)}.")
    if num_slots < 1 or block_m < 1:
        raise ValueError(f"align_pairs needs num_slots >= 1 and block_m >= 1, got {num_slots} and {block_m}.")
    num_pairs, device = slots.shape[0], slots.device
    max_padded = max_padded_pairs(num_pairs, num_slots, block_m)
    # scatter_add_, not bincount: bincount reads its maximum back to the host on CUDA.
    counts = torch.zeros(num_slots, dtype=torch.long, device=device).scatter_add_(0, slots, torch.ones_like(slots))  # [S]
    padded_counts = (counts + block_m - 1) // block_m * block_m  # [S]
    padded_end = torch.cumsum(padded_counts, 0)  # [S]
    group_start = padded_end - padded_counts  # [S] where each slot's padded group begins
    first_of_slot = torch.cumsum(counts, 0) - counts  # [S] where each slot's pairs begin, unpadded

    order = torch.sort(slots, stable=True).indices  # [P] pair indices grouped by slot
    sorted_slots = slots[order]  # [P]
    rank = torch.arange(num_pairs, device=device) - first_of_slot[sorted_slots]  # [P] place inside its group
    sorted_pairs = torch.full((max_padded,), num_pairs, dtype=torch.long, device=device)
    sorted_pairs.scatter_(0, group_start[sorted_slots] + rank, order)  # [max_padded]

    block_starts = torch.arange(0, max_padded, block_m, device=device)  # [max_blocks]
    block_slot = torch.searchsorted(padded_end, block_starts, right=True)  # [max_blocks]
    return Alignment(sorted_pairs, block_slot, padded_end[-1:], num_pairs, num_slots, block_m)


def grouped_gemm(
    a: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    alignment: Alignment | None = None,
    force_triton: bool = False,
) -> torch.Tensor:
    """out[p] = a[rows[p]] @ weights[slots[p]].T for p in 0..P-1: a [R, Kdim], rows [P], slots [P],
    weights [S, N, Kdim] → out [P, N] (written into `out` when given), in a's dtype.

    alignment: align_pairs(slots, S) computed once and shared by the GEMMs over the same pairs (gate_up,
        then down); built here when None (Triton path only; the reference path needs none).
    force_triton: take the Triton path on CPU tensors too (tests, under TRITON_INTERPRET=1).
    """
    cpu_kernel = not force_triton and runs_cpu_kernel(a.device, a.dtype)
    num_pairs, n_out = _check_shapes(a, rows, slots, weights, out, alignment, cpu_kernel)
    if cpu_kernel:
        result = cpu_gemm.cpu_grouped_gemm(a, rows, slots, weights)  # [P, N]
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty(num_pairs, n_out, dtype=a.dtype, device=a.device)
    if num_pairs == 0:
        return out
    if force_triton or runs_kernel(a.device):
        from moeserve.layers.grouped_gemm_triton import launch

        if alignment is None:
            alignment = align_pairs(slots, weights.shape[0])
        launch(a, rows, weights, out, alignment)
        return out
    return out.copy_(reference_grouped_gemm(a, rows, slots, weights))


def reference_grouped_gemm(
    a: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The gather + torch.bmm reference: [P, N], the same semantics (no shape checks)."""
    # Each pair is its own [1, Kdim] x [Kdim, N] product of the batch: no pair's sum sees another's values.
    return torch.bmm(a[rows].unsqueeze(1), weights[slots].transpose(1, 2)).squeeze(1)  # [P, N]


def grouped_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h [n, Kdim] @ weight [N, Kdim].T through grouped_gemm as one slot with rows 0..n-1: each row comes out
    bit for bit as it would among any other pairs of any other call. On the CPU kernel without index tensors
    (cpu_gemm.cpu_linear, the same bits)."""
    if runs_cpu_kernel(h.device, h.dtype) and h.dim() == 2 and cpu_gemm.weight_dtype_fits(h.dtype, weight.dtype):
        return cpu_gemm.cpu_linear(h, weight)
    rows = torch.arange(h.shape[0], device=h.device)  # [n]
    return grouped_gemm(h, rows, torch.zeros_like(rows), weight.unsqueeze(0))


def _check_shapes(a, rows, slots, weights, out, alignment, cpu_kernel: bool) -> tuple[int, int]:
    """(P, N) after checking that the arguments fit together; a ValueError names the one that does not.
    `cpu_kernel`: the CPU kernel runs the call (it alone takes bfloat16 weights under float32 a)."""
    if a.dim() != 2 or weights.dim() != 3:
        raise ValueError(
            f"grouped_gemm needs a [R, Kdim] and weights [S, N, Kdim], got {tuple(a.shape)} and {tuple(weights.shape)}."
        )
    num_slots, n_out, k_dim = weights.shape
    if a.shape[1] != k_dim:
        raise ValueError(f"grouped_gemm: a has {a.shape[1]} features but weights take {k_dim}.")
    mixed_fits = cpu_kernel and cpu_gemm.weight_dtype_fits(a.dtype, weights.dtype)
    if (a.dtype != weights.dtype and not mixed_fits) or a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"grouped_gemm needs a and weights in one of float32, bfloat16, float16 (or bfloat16 weights under "
            f"float32 a, on the CPU kernel), got {a.dtype} and {weights.dtype}."
        )
    if weights.stride(2) != 1 or (n_out > 1 and weights.stride(1) != k_dim):
        raise ValueError(f"grouped_gemm needs each slot's [N, Kdim] matrix contiguous, got strides {weights.stride()}.")
    for name, ids in (("rows", rows), ("slots", slots)):
        if ids.dim() != 1 or ids.dtype != torch.long:
            raise ValueError(
                f"grouped_gemm needs {name} as a 1-D long tensor, got {ids.dtype} of shape {tuple(ids.shape)}."
            )
    if rows.shape != slots.shape:
        raise ValueError(
            f"grouped_gemm needs one row and one slot per pair, got {rows.shape[0]} rows and {slots.shape[0]} slots."
        )
    if len({a.device, rows.device, slots.device, weights.device}) != 1:
        raise ValueError("grouped_gemm needs a, rows, slots and weights on one device.")
    num_pairs = rows.shape[0]
    if out is not None and (out.shape != (num_pairs, n_out) or out.dtype != a.dtype or out.device != a.device):
        raise ValueError(
            f"grouped_gemm needs out as [{num_pairs}, {n_out}] {a.dtype} on {a.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}."
        )
    if alignment is not None and (alignment.num_pairs, alignment.num_slots) != (num_pairs, num_slots):
        raise ValueError(
            f"grouped_gemm: the alignment is for {alignment.num_pairs} pairs over {alignment.num_slots} slots, "
            f"the call has {num_pairs} pairs over {num_slots} slots."
        )
    return num_pairs, n_out
