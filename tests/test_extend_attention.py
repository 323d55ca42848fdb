"""Extend-step attention (a prompt's later chunks, prompts after a prefix-cache hit): the step's masks are
made once for every layer, and on a CPU in float32 / float64 without a sliding window cutting in, attention
runs as the cached part plus the causal new part merged by log-sum-exp (layers/attention.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeserve.kv.context import StepContext
from moeserve.layers.attention import prefix_then_causal, splits_at_the_prefix


def masked(query, keys, values, cached, window=None):
    new = query.shape[2]
    query_pos = torch.arange(cached, cached + new)[:, None]
    key_pos = torch.arange(cached + new)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, enable_gqa=True)


def inputs(heads, kv_heads, dim, cached, new, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # queries laid out as the attention layer makes them: [new, H, Dh] transposed
    query = torch.randn(1, new, heads, dim, generator=generator, dtype=dtype).transpose(1, 2)
    keys = torch.randn(1, kv_heads, cached + new, dim, generator=generator, dtype=dtype)
    values = torch.randn(1, kv_heads, cached + new, dim, generator=generator, dtype=dtype)
    return query, keys * 2, values  # sharper scores than unit ones


@pytest.mark.parametrize(
    "heads, kv_heads, dim, cached, new",
    [(8, 4, 64, 1536, 512), (4, 2, 8, 5, 3), (4, 4, 16, 1, 1), (6, 1, 32, 100, 1), (4, 2, 8, 3, 40),
     (2, 2, 8, 700, 300)],
)
def test_prefix_then_causal_equals_masked_attention(heads, kv_heads, dim, cached, new):
    for dtype, tolerance in ((torch.float32, 2e-6), (torch.float64, 1e-14)):
        query, keys, values = inputs(heads, kv_heads, dim, cached, new, dtype)
        ours = prefix_then_causal(query, keys, values, cached)
        assert ours.shape == (1, heads, new, dim) and ours.dtype == dtype
        assert (ours - masked(query, keys, values, cached)).abs().max().item() <= tolerance


def test_the_split_is_taken_only_where_it_is_exact():
    query = torch.zeros(1, 4, 3, 8)
    assert splits_at_the_prefix(query, None, 10)
    assert splits_at_the_prefix(query.double(), 10, 10)  # a window that reaches every position cuts nothing
    assert not splits_at_the_prefix(query, 9, 10)  # a window that cuts in needs the mask
    assert not splits_at_the_prefix(query.bfloat16(), None, 10)  # each part would round to bfloat16 first
    assert not splits_at_the_prefix(query.half(), None, 10)


class _Cache:
    block_size = 16


def context(cached_lens, query_lens):
    total = sum(query_lens)
    slots = torch.zeros(1, total, dtype=torch.long)
    return StepContext(_Cache(), torch.arange(total), slots, query_lens, cached_lens, [])


def test_masks_are_made_once_a_step_and_match_what_sdpa_makes_of_the_boolean_one():
    ctx = context([0, 7, 30], [5, 4, 6])
    assert ctx.mask(0, None, torch.float32) is None  # nothing cached, no window: plain causal
    for seq, window in ((1, None), (2, None), (2, 4), (0, 3)):
        allowed = ctx.allowed(seq, window)
        cached, new = ctx.cached_lens[seq], ctx.query_lens[seq]
        query_pos = torch.arange(cached, cached + new)[:, None]
        key_pos = torch.arange(cached + new)[None, :]
        expected = (key_pos <= query_pos) & (key_pos > query_pos - (window or cached + new + 1))
        assert torch.equal(allowed, expected)
        for dtype in (torch.float32, torch.bfloat16):
            mask = ctx.mask(seq, window, dtype)
            assert mask is ctx.mask(seq, window, dtype)  # every layer reads the same tensor
            assert mask.dtype == dtype and torch.equal(mask == 0, allowed)
            query, keys, values = inputs(4, 2, 8, cached, new, dtype)
            by_sdpa = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, enable_gqa=True)
            ours = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
            assert torch.equal(ours, by_sdpa)
