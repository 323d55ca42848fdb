"""Long-lived CPU weight buffers on transparent huge pages.

Why: a decode step streams every weight it uses from memory once. In 4 KiB pages that is a TLB miss every
4 KiB (37,000 a token for a 145 MB bfloat16 model), and the hardware prefetcher stops at each page's end.
In 2 MiB pages, one core of an AMD EPYC (Zen 4) streamed a batch-1 bfloat16 GEMV at 30 GB/s instead of 24
(a standalone loop over 512 MiB of weights). Linux gives an anonymous mapping huge pages where it is told to
(`MADV_HUGEPAGE`, which the common `transparent_hugepage=madvise` setting requires) and where a 2 MiB range
of it is 2 MiB-aligned, so a buffer is mapped with 2 MiB to spare and starts on a 2 MiB boundary.

Only buffers that live as long as the model and are read every step come from here (stacked experts, the
offload cache's slot pool, large dense weights): a mapping per short-lived tensor would cost more than it
saves. Elsewhere (no `madvise`, no huge pages configured, another OS) the buffer is ordinary memory and the
arithmetic is the same: only where the bytes sit changes.
"""

from __future__ import annotations

import math
import mmap
from typing import Sequence

import torch

from moeserve.alignment import aligned_empty

HUGE_PAGE = 2 << 20  # bytes
# Below this a buffer would not fill one huge page: ordinary memory.
MIN_BYTES = HUGE_PAGE


def weight_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zeroed, contiguous, writable tensor for weights read every step: on a CPU and at least `MIN_BYTES`,
    starting on a 2 MiB boundary of a mapping advised to use huge pages; else `aligned_empty` zeroed."""
    device = torch.device(device)
    shape = tuple(int(size) for size in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return aligned_empty(shape, dtype, device).zero_()
    # private and anonymous (Python's default for -1 is a shared mapping, which is shmem: no huge pages there);
    # zero-filled pages, faulted in on first write
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: ordinary pages
        pass
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive as long as any view of it
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).view(shape)
