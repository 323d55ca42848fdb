"""Long-lived weight buffers (moeserve/huge_pages.py): zeroed, writable, of the asked shape and dtype, on a 2 MiB
boundary where large, and alive as long as a view of them is."""

from __future__ import annotations

import gc

import pytest
import torch

from moeserve import huge_pages
from moeserve.alignment import ALIGNMENT
from moeserve.huge_pages import weight_buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_large_buffer_starts_on_a_huge_page_and_outlives_its_mapping_s_name(dtype):
    shape = (3, huge_pages.MIN_BYTES // dtype.itemsize // 2 + 5)  # not a whole number of huge pages
    buffer = weight_buffer(shape, dtype)
    assert buffer.shape == shape and buffer.dtype == dtype and buffer.is_contiguous()
    if hasattr(huge_pages.mmap, "MADV_HUGEPAGE"):
        assert buffer.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert not buffer.any()
    view = buffer[1:]
    del buffer
    gc.collect()
    view.fill_(2.5)  # the mapping lives while a view does
    values = torch.arange(view.numel(), dtype=torch.float32).to(dtype).view(view.shape)
    view.copy_(values)
    assert torch.equal(view, values)


def test_a_small_buffer_is_ordinary_aligned_memory():
    buffer = weight_buffer((4, 8), torch.float32)
    assert buffer.data_ptr() % ALIGNMENT == 0 and not buffer.any() and buffer.shape == (4, 8)
