"""Every weight a matmul reads starts on a 64-byte boundary.

Why: a BLAS kernel may take a different path (and round differently) depending on where its operand
starts. On an AMD EPYC with AVX2 only, MKL's sgemv gave other bits for a one-row F.linear when the
weight started 8 or 56 bytes past a 64-byte boundary than at 0, 16 or 32. A resident expert mapped
from safetensors (which aligns tensor data to 8 bytes only) and the same expert decoded into a cache
slot then computed different outputs. With one alignment everywhere, the address never picks the
arithmetic: mapped weights that start elsewhere are copied once at load, and every buffer that holds
weights (cache slots, stacked experts, decoded tensors) is laid out on 64-byte boundaries.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

ALIGNMENT = 64  # bytes: a cache line, and the widest vector load (AVX-512) of any CPU kernel


def is_aligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % ALIGNMENT == 0


def aligned_numel(numel: int, dtype: torch.dtype) -> int:
    """`numel` rounded up so that that many values of `dtype` span a whole number of alignments: the
    stride that keeps every region of a row (and every row) aligned when the row starts aligned."""
    per_alignment = ALIGNMENT // dtype.itemsize
    return -(-numel // per_alignment) * per_alignment


def rows_per_alignment(row_numel: int, dtype: torch.dtype) -> int:
    """The fewest rows of `row_numel` values of `dtype` that span a whole number of alignments: rows of
    a tensor that starts aligned start aligned every that many rows (1 for most hidden sizes)."""
    return ALIGNMENT // math.gcd(ALIGNMENT, row_numel * dtype.itemsize)


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialized contiguous tensor whose first value starts on a 64-byte boundary.

    torch's allocators already align this much (64 bytes on the CPU, 256 or more on CUDA), so the
    first allocation is normally the result; only an allocator that aligns less gets a padded one."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if is_aligned(tensor):
        return tensor
    numel = tensor.numel()
    padded = torch.empty(numel + ALIGNMENT // dtype.itemsize, dtype=dtype, device=device)
    start = (-padded.data_ptr() % ALIGNMENT) // dtype.itemsize
    return padded[start : start + numel].view(shape)


def ensure_aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself where it starts on a 64-byte boundary (a mapped checkpoint stays mapped), else a
    contiguous copy that does."""
    if is_aligned(tensor):
        return tensor
    return aligned_empty(tensor.shape, tensor.dtype, tensor.device).copy_(tensor)
