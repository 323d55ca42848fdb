"""The C++ twins of the CPU ops (moeserve/native_ops.py, csrc/torch_ops.cpp): built on first use, the same bits
as the Python ops they replace in compiled steps, the same refusals, and a clean fallback when they cannot
be built."""

from __future__ import annotations

import pytest
import torch

from moeserve import LLM, SamplingParams, native_ops
from moeserve.codecs.szp_cpu import held_slots_address
from moeserve.layers import cpu_attention, cpu_gemm
from moeserve.layers.mlp import ACTIVATIONS

pytestmark = pytest.mark.skipif(not cpu_gemm.available(torch.float32), reason="the CPU GEMM extension is not built")


@pytest.fixture(scope="module")
def native():
    if not native_ops.load(cpu_gemm.entry_address(), cpu_attention.entry_address(), held_slots_address(), progress=False):
        pytest.fail(f"the C++ ops did not build: {native_ops._state.get('failure')}")
    return torch.ops.moeserve_native


@pytest.mark.exact
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gemm_ops_give_the_python_ops_bits(native, dtype):
    g = torch.Generator().manual_seed(3)
    for rows_n, pairs, slots_n, n_out, k_dim in [(3, 6, 4, 96, 80), (1, 2, 8, 128, 128), (5, 9, 2, 17, 33)]:
        a = torch.randn(rows_n, k_dim, generator=g).to(dtype)
        weights = torch.randn(slots_n, n_out, k_dim, generator=g).to(dtype)
        rows = torch.randint(0, rows_n, (pairs,), generator=g)
        slots = torch.randint(0, slots_n, (pairs,), generator=g)
        assert torch.equal(native.cpu_grouped_gemm(a, rows, slots, weights), torch.ops.moeserve.cpu_grouped_gemm(a, rows, slots, weights))
        assert torch.equal(native.cpu_linear(a, weights[1]), torch.ops.moeserve.cpu_linear(a, weights[1]))
        if dtype == torch.float32:  # bfloat16 weights under float32 a: an expert cache's bfloat16 slots
            narrow = weights.to(torch.bfloat16)
            assert torch.equal(native.cpu_grouped_gemm(a, rows, slots, narrow),
                               torch.ops.moeserve.cpu_grouped_gemm(a, rows, slots, narrow.float()))
            assert torch.equal(native.cpu_linear(a, narrow[1]), torch.ops.moeserve.cpu_linear(a, narrow[1]))
        strided = torch.randn(rows_n, 2 * k_dim, generator=g).to(dtype)[:, ::2]  # features not contiguous
        assert torch.equal(native.cpu_linear(strided, weights[0]), cpu_gemm.cpu_linear(strided.contiguous(), weights[0]))


def test_the_gemm_ops_refuse_what_the_python_ops_refuse(native):
    a, weights = torch.randn(2, 8), torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="slot 7"):
        native.cpu_grouped_gemm(a, torch.tensor([0, 1]), torch.tensor([0, 7]), weights)
    with pytest.raises(ValueError, match="row"):
        native.cpu_grouped_gemm(a, torch.tensor([0, 5]), torch.tensor([0, 1]), weights)
    with pytest.raises(ValueError, match="weights in a's dtype"):
        native.cpu_grouped_gemm(a.to(torch.bfloat16), torch.tensor([0]), torch.tensor([0]), weights)
    with pytest.raises(ValueError, match="contiguous"):
        native.cpu_grouped_gemm(a, torch.tensor([0]), torch.tensor([0]), weights.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        native.cpu_linear(a.half(), weights[0].half())


@pytest.mark.exact
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_gated_activation_gives_the_eager_expression_bits_row_by_row(native, dtype, act):
    # A compiled step applies it to the gate and up halves of a layer's fused [P, 2I] product; the host path to
    # one expert's [n, 2I] rows. Each row must come out alike either way (I = 37 leaves a tail after any vector
    # width), and as the eager `act(gate) * up` gives it. Not so for erf's gelu: torch hands larger tensors to
    # oneDNN, whose rounding differs, so there a row's bits depend on the batch even in eager steps (none of
    # the supported families uses it; they use silu).
    g = torch.Generator().manual_seed(6)
    intermediate = 37
    fused = (4 * torch.randn(5, 2 * intermediate, generator=g)).to(dtype)  # [P, 2I]
    gate, up = fused.chunk(2, dim=-1)
    want = ACTIVATIONS[act](gate) * up
    for op in (native.gated_activation, torch.ops.moeserve.gated_activation):
        got = op(gate, up, act)
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, want)
        for row in range(fused.shape[0] if act != "gelu" else 0):
            alone = fused[row : row + 1].chunk(2, dim=-1)
            assert torch.equal(op(*alone, act), got[row : row + 1])
    with pytest.raises(ValueError, match="unknown activation swish"):
        native.gated_activation(gate, up, "swish")


def test_kv_write_writes_what_the_python_op_writes(native):
    g = torch.Generator().manual_seed(4)
    pools = [torch.zeros(4, 16, 2, 8) for _ in range(4)]
    slots = torch.tensor([3, 17, 40])
    keys, values = torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    native.kv_write(pools[0], pools[1], slots, keys, values)
    torch.ops.moeserve.kv_write(pools[2], pools[3], slots, keys, values)
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3]) and pools[0].abs().sum() > 0
    native.kv_write(pools[0], None, slots, keys * 2, None)  # MLA: latents only
    assert torch.equal(pools[0].view(-1, 2, 8)[slots], keys * 2)
    # entries that are not contiguous take index_copy_'s path, with the same result
    strided = torch.randn(3, 2, 16, generator=g)[:, :, ::2]
    native.kv_write(pools[0], None, slots, strided, None)
    torch.ops.moeserve.kv_write(pools[2], None, slots, strided, None)
    assert torch.equal(pools[0], pools[2])
    with pytest.raises(IndexError, match="slot 64 is out of range for a pool of 64 positions"):
        native.kv_write(pools[0], None, torch.tensor([1, 64, 2]), keys, None)
    assert torch.equal(pools[0], pools[2])  # a refused write writes nothing


@pytest.mark.exact
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_gives_the_python_op_bits(native, dtype):
    g = torch.Generator().manual_seed(5)
    k_pool, v_pool = torch.randn(2, 9, 4, 2, 24, generator=g).to(dtype)
    tables = torch.tensor([[3, 1, 4, 0], [8, 2, 6, 5], [0, 0, 0, 0]])
    positions = torch.tensor([9, 15, 0])
    query = torch.randn(3, 6, 24, generator=g).to(dtype)
    sinks = torch.randn(6, generator=g).to(dtype)
    for v, window, sink, value_dim in [(v_pool, None, None, 24), (v_pool, 5, sinks, 24), (None, None, None, 16)]:
        want = torch.ops.moeserve.cpu_paged_decode(query, k_pool, v, tables, positions, 0.2, window or 0, sink, value_dim)
        got = native.cpu_paged_decode(query, k_pool, v, tables, positions, 0.2, window or 0, sink, value_dim)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="outside its block table"):
        native.cpu_paged_decode(query, k_pool, v_pool, tables, torch.tensor([9, 16, 0]), 0.2, 0, None, 24)
    with pytest.raises(ValueError, match="one dtype"):
        native.cpu_paged_decode(query, k_pool.double(), v_pool, tables, positions, 0.2, 0, None, 24)


def test_a_failed_build_keeps_the_python_ops(monkeypatch, capfd, checkpoint_factory, tmp_path):
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_ops, "_state", {})
    monkeypatch.setattr(native_ops, "_source_dir", lambda: None)
    directory, _ = checkpoint_factory("qwen3_moe", num_hidden_layers=2, num_experts=8, seed=5)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    eager = LLM(directory, device="cpu", enforce_eager=True, progress=False).generate([[1, 2, 3]], params)
    compiled = LLM(directory, device="cpu", enforce_eager=False, progress=True).generate([[1, 2, 3]], params)
    assert compiled[0].token_ids == eager[0].token_ids
    assert not native_ops.loaded() and native_ops.ops() is torch.ops.moeserve
    err = capfd.readouterr().err
    assert "the C++ CPU ops could not be built (RuntimeError: csrc/torch_ops.cpp is not installed with moeserve)" in err
    assert err.count("could not be built") == 1
