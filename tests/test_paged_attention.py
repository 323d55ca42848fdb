"""Decode attention over paged KV blocks: the CPU gather path, the CPU kernel and the Triton kernel against a
plain reference.

Fresh random pools, block tables that scatter each sequence over the pool in random order, positions that
end mid-block and on block edges, GQA, sliding windows, sinks and MLA's latent-as-value layout. The Triton
kernel runs in the Triton interpreter (a TRITON_INTERPRET=1 subprocess, since the variable must be set before
triton is imported) and on CUDA when there is one; the CPU kernel (csrc/cpu_attention.cpp) on every path this
CPU has.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from triton_interpreter import (
    HAS_TRITON,
    INTERPRETED,
    assert_interpreted_tests_pass,
    interpreter_only,
    requires_cuda_triton,
)
from moeserve.kv.cache import KvLayout, PagedKVCache
from moeserve.kv.context import DecodeContext, Part
from moeserve.layers import cpu_attention, cpu_gemm
from moeserve.layers.paged_attention import paged_decode_attention, paged_decode_reference, triton_paged_decode
from moeserve.layers.sinks import sink_attention

# (heads, kv heads, key dim, value dim or None for separate V of the key's size, window, sinks)
CASES = [
    (4, 2, 16, None, None, False),  # GQA
    (4, 4, 8, None, 5, False),  # sliding window
    (8, 2, 16, None, 7, True),  # window and sinks (gpt_oss)
    (4, 1, 20, 12, None, False),  # MLA: one latent "head" serving as keys, its first 12 values as values
]
BLOCK = 4


def random_case(heads, kv_heads, key_dim, value_dim, sinks, dtype, device, seed):
    """A pool with three sequences scattered over it, in random block order."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.tensor([0, 9, 22])  # one, mid-block, last of a block (23 tokens = blocks of 4: 5 full + 3)
    num_blocks = 1 + 16
    k_pool = torch.randn(num_blocks, BLOCK, kv_heads, key_dim, generator=gen).to(dtype)
    v_pool = None if value_dim else torch.randn(num_blocks, BLOCK, kv_heads, key_dim, generator=gen).to(dtype)
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.zeros(3, 8, dtype=torch.long)  # padded with the null block 0
    for row, position in enumerate(positions.tolist()):
        needed = position // BLOCK + 1
        tables[row, :needed] = torch.tensor([order.pop() for _ in range(needed)])
    query = torch.randn(3, heads, key_dim, generator=gen).to(dtype)
    sink = torch.randn(heads, generator=gen) if sinks else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(query), move(k_pool), move(v_pool), move(tables), move(positions), move(sink)


def cache_over(k_pool, v_pool, window) -> PagedKVCache:
    """A one-layer cache holding these pools."""
    kv_heads, key_dim = k_pool.shape[2], k_pool.shape[3]
    layout = KvLayout(1, kv_heads, key_dim, v_pool is not None, (window,), k_pool.dtype)
    cache = PagedKVCache(layout, k_pool.shape[0], BLOCK, k_pool.device)
    cache.keys(0).copy_(k_pool)
    if v_pool is not None:
        cache.values(0).copy_(v_pool)
    return cache


def gathered_attention(query, k_pool, v_pool, tables, positions, window, sinks, value_dim):
    """What layers/attention.py and layers/mla.py compute without the kernel: gather into the workspace, then SDPA."""
    key_dim = k_pool.shape[3]
    cache = cache_over(k_pool, v_pool, window)
    part = Part(0, query.shape[0], tables.shape[1])
    ctx = DecodeContext(cache, positions, positions[None], tables[None], (part,))
    keys, values = ctx.read(0, 0, part, window)  # [B, G, L, Dk]
    values = keys[..., :value_dim] if v_pool is None else values
    mask = ctx.mask(window, part)
    scale = key_dim**-0.5
    q = query.unsqueeze(2)  # [B, H, 1, Dk]
    if sinks is not None:
        return sink_attention(q, keys, values, mask, sinks).squeeze(2)
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    ).squeeze(2)


@pytest.mark.parametrize("heads, kv_heads, key_dim, value_dim, window, sinks", CASES)
def test_gathered_blocks_attend_like_the_reference(heads, kv_heads, key_dim, value_dim, window, sinks):
    query, k_pool, v_pool, tables, positions, sink = random_case(
        heads, kv_heads, key_dim, value_dim, sinks, torch.float32, "cpu", seed=heads + key_dim
    )
    got = gathered_attention(query, k_pool, v_pool, tables, positions, window, sink, value_dim)
    want = paged_decode_reference(query, k_pool, v_pool, tables, positions, key_dim**-0.5, window, sink, value_dim)
    assert (got - want).abs().max().item() <= 1e-5


def test_the_gather_workspace_is_kept_between_steps():
    query, k_pool, v_pool, tables, positions, _ = random_case(4, 2, 16, None, False, torch.float32, "cpu", seed=1)
    cache = cache_over(k_pool, v_pool, None)
    part = Part(0, 3, tables.shape[1])
    first = [t.data_ptr() for t in DecodeContext(cache, positions, positions[None], tables[None], (part,)).read(0, 0, part, None)]
    workspace = cache.workspace_nbytes
    for _ in range(3):  # later steps, each with its own context
        ctx = DecodeContext(cache, positions, positions[None], tables[None], (part,))
        assert [t.data_ptr() for t in ctx.read(0, 0, part, None)] == first
    assert cache.workspace_nbytes == workspace > 0


def _triton(query, k_pool, v_pool, tables, positions, scale, window, sinks, value_dim):
    values = k_pool if v_pool is None else v_pool
    return triton_paged_decode(query, k_pool, values, tables, positions, scale, window, sinks, value_dim or values.shape[-1])


def _check_kernel(kernel, device, dtype, rtol):
    for seed, (heads, kv_heads, key_dim, value_dim, window, sinks) in enumerate(CASES):
        query, k_pool, v_pool, tables, positions, sink = random_case(
            heads, kv_heads, key_dim, value_dim, sinks, dtype, device, seed
        )
        scale = key_dim**-0.5
        got = kernel(query, k_pool, v_pool, tables, positions, scale, window, sink, value_dim)
        want = paged_decode_reference(query, k_pool, v_pool, tables, positions, scale, window, sink, value_dim)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.allclose(got.float(), want.float(), rtol=rtol, atol=rtol), (heads, kv_heads, window, sinks)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton, or the test extra)")
@pytest.mark.skipif(INTERPRETED, reason="this is the driver of the interpreted run")
def test_triton_interpreter_subprocess():
    assert_interpreted_tests_pass(Path(__file__), "interpreted_kernel")


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_kernel_matches_the_reference(dtype):
    _check_kernel(_triton, "cpu", dtype, 1e-5 if dtype == torch.float32 else 2**-7)


@pytest.mark.gpu
@requires_cuda_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_cuda_matches_the_reference(dtype):
    _check_kernel(paged_decode_attention, "cuda", dtype, 1e-5 if dtype == torch.float32 else 2**-8)


requires_cpu_kernel = pytest.mark.skipif(not cpu_attention.available(torch.float32),
                                         reason="the CPU kernel extension is not built")


@pytest.fixture
def each_isa():
    """Runs the test body once per instruction-set path this CPU has (they must agree bit for bit)."""
    before = cpu_gemm.isa()
    yield cpu_gemm.supported_isas()
    cpu_gemm.set_isa(before)


@requires_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_matches_the_reference(dtype, each_isa):
    for isa in each_isa:
        cpu_gemm.set_isa(isa)
        _check_kernel(paged_decode_attention, "cpu", dtype, 1e-5 if dtype == torch.float32 else 2**-8)


def _random_calls(dtype):
    """Fresh random cases of odd sizes (a key size off the 16 lanes, one KV head per query head, MLA values)
    with their kernel arguments."""
    gen = torch.Generator().manual_seed(1234)
    for heads, kv_heads, key_dim, value_dim, window, sinks in [*CASES, (6, 3, 37, None, 3, True), (2, 2, 80, 33, None, False)]:
        query, k_pool, v_pool, tables, positions, sink = random_case(
            heads, kv_heads, key_dim, value_dim, sinks, dtype, "cpu", int(torch.randint(1 << 20, (1,), generator=gen))
        )
        yield query, k_pool, v_pool, tables, positions, key_dim**-0.5, window, sink, value_dim


@requires_cpu_kernel
@pytest.mark.exact
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_paths_agree_and_rows_stand_alone(dtype, each_isa):
    """Every path writes the same bits, and a row alone gives the bits it gives within the batch."""
    for args in _random_calls(dtype):
        query, k_pool, v_pool, tables, positions, scale, window, sink, value_dim = args
        results = []
        for isa in each_isa:
            cpu_gemm.set_isa(isa)
            results.append(paged_decode_attention(*args))
        assert all(torch.equal(results[0], r) for r in results[1:]), each_isa
        for row in range(query.shape[0]):
            alone = paged_decode_attention(query[row : row + 1], k_pool, v_pool, tables[row : row + 1],
                                           positions[row : row + 1], scale, window, sink, value_dim)
            assert torch.equal(alone, results[0][row : row + 1])


@requires_cpu_kernel
@pytest.mark.exact
def test_cpu_kernel_threads_do_not_change_a_bit():
    """A call large enough to run on several threads gives the single thread's bits."""
    gen = torch.Generator().manual_seed(7)
    k_pool, v_pool = torch.randn(2, 33, 64, 4, 64, generator=gen)
    tables = torch.randperm(33, generator=gen)[:32].reshape(4, 8) + 0
    query, positions = torch.randn(4, 8, 64, generator=gen), torch.tensor([511, 300, 17, 0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = paged_decode_attention(query, k_pool, v_pool, tables, positions, 0.125, None, None)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(paged_decode_attention(query, k_pool, v_pool, tables, positions, 0.125, None, None), alone)
    finally:
        torch.set_num_threads(threads)


@requires_cpu_kernel
def test_cpu_kernel_refuses_what_it_cannot_read():
    query, k_pool, v_pool, tables, positions, _ = random_case(4, 2, 16, None, False, torch.float32, "cpu", seed=3)
    with pytest.raises(ValueError, match="outside its block table"):
        paged_decode_attention(query, k_pool, v_pool, tables, torch.tensor([0, 9, 32]), 0.25, None, None)
    bad = tables.clone()
    bad[1, 0] = k_pool.shape[0]
    with pytest.raises(ValueError, match="reads block 17, outside the pools' 17 blocks"):
        paged_decode_attention(query, k_pool, v_pool, bad, positions, 0.25, None, None)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        paged_decode_attention(query.half(), k_pool.half(), v_pool.half(), tables, positions, 0.25, None, None)
    with pytest.raises(ValueError, match="does not fit the K pool"):
        paged_decode_attention(query[:, :3], k_pool, v_pool, tables, positions, 0.25, None, None)
    assert not cpu_attention.available(torch.float16)
