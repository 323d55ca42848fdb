"""Every expert weight a matmul reads starts on a 64-byte boundary: resident or in a cache slot, every
family, every stored dtype. A BLAS kernel may round differently by the weight's address (MKL's sgemv
on an AVX2-only EPYC did, at 56 mod 64 against 0), so bit equality between resident and offloaded
experts needs one alignment everywhere (moeserve/alignment.py). These checks hold on any machine,
whether or not its kernels show the difference."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_CONFIGS
from test_mxfp4 import write_mxfp4_checkpoint

import moeserve.layers.moe as moe
from moeserve import LLM, SamplingParams
from moeserve.alignment import ALIGNMENT, aligned_empty, ensure_aligned, is_aligned
from moeserve.experts import ExpertWeights, stack_experts
from moeserve.offload.cache import SlotPool

RAW = {"default": {"codec": "raw"}}
PROMPT = [[5, 6, 7, 8, 9]]  # prefill: several rows per expert; decode: one row (F.linear's sgemv)
GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def store_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def matmul_weights(monkeypatch) -> list[torch.Tensor]:
    """Every expert weight the MoE blocks hand to a matmul, recorded at the block's two entry points
    (layers/moe.py): gate_and_up multiplies gate and up kept apart itself on steps without a grouped GEMM
    kernel (and hands them to expert_linear on the others), expert_linear every other."""
    seen: list[torch.Tensor] = []
    gate_and_up, expert_linear = moe.gate_and_up, moe.expert_linear

    def recording_gate_and_up(h, w, grouped):
        if w.gate_up is None:
            seen.extend((w.gate, w.up))
        return gate_and_up(h, w, grouped)  # its fused matmul goes through the recording expert_linear

    def recording_expert_linear(h, weight, grouped, out=None):
        seen.append(weight)
        return expert_linear(h, weight, grouped, out)

    monkeypatch.setattr(moe, "gate_and_up", recording_gate_and_up)
    monkeypatch.setattr(moe, "expert_linear", recording_expert_linear)
    return seen


def _assert_all_aligned(weights: list[torch.Tensor], what: str) -> None:
    assert weights, f"{what}: no expert matmul was recorded"
    offsets = sorted({t.data_ptr() % ALIGNMENT for t in weights})
    assert offsets == [0], f"{what}: expert weights start at {offsets} mod {ALIGNMENT}"


def _resident_then_offloaded(directory, compute_dtype, matmul_weights, policy=RAW) -> None:
    """Generates resident, then offloaded under `policy` (None: the checkpoint's default) with the
    smallest cache, so every expert is computed from a slot; checks what each run's matmuls read."""
    resident = LLM(directory, device="cpu", dtype=compute_dtype)
    resident.generate(PROMPT, GREEDY)
    _assert_all_aligned(matmul_weights, "resident")
    matmul_weights.clear()
    c = resident.config
    smallest = c.top_k * SlotPool.slot_nbytes(c.hidden_size, c.moe_intermediate_size, c.dtype)  # one layer's top-k
    offloaded = LLM(directory, device="cpu", dtype=compute_dtype, policy=policy, expert_cache=smallest,
                    progress=False)
    offloaded.generate(PROMPT, GREEDY)
    assert offloaded.offload.stats.misses > 0
    _assert_all_aligned(matmul_weights, "offloaded")


@pytest.mark.parametrize(
    "stored_dtype,compute_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "float32")],
    ids=["float32", "bfloat16", "bfloat16-as-float32"],
)
@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_every_expert_matmul_reads_aligned_weights(checkpoint_factory, matmul_weights, model_type, stored_dtype,
                                                   compute_dtype):
    directory, _ = checkpoint_factory(model_type, dtype=stored_dtype, seed=5)
    _resident_then_offloaded(directory, compute_dtype, matmul_weights)


def test_every_expert_matmul_reads_aligned_weights_of_an_mxfp4_checkpoint(tmp_path, matmul_weights):
    from conftest import make_hf_model

    directory = tmp_path / "mxfp4"
    directory.mkdir()
    write_mxfp4_checkpoint(make_hf_model("gpt_oss", seed=4).to(torch.bfloat16), directory)
    _resident_then_offloaded(directory, None, matmul_weights, policy=None)  # experts stay MXFP4 in the store


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_slot_and_stacked_row_is_aligned_at_odd_sizes(dtype):
    # I * D values of 15 make no whole number of 64-byte lines in any dtype: rows must be padded.
    intermediate, hidden, count = 5, 3, 4
    pool = SlotPool(count, hidden, intermediate, dtype, torch.device("cpu"))
    matrices = [t for slot in range(count) for t in (pool.weights(slot).gate_up, pool.weights(slot).down)]
    assert all(is_aligned(t) for t in matrices)
    assert pool.nbytes == count * SlotPool.slot_nbytes(hidden, intermediate, dtype)

    shapes = ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))  # gate, up, down
    experts = [ExpertWeights(*(torch.randn(shape).to(dtype) for shape in shapes)) for _ in range(count)]
    stacked = stack_experts(experts, count, intermediate, hidden, torch.device("cpu"), dtype)
    for row, w in enumerate(experts):
        assert is_aligned(stacked.gate_up[row]) and is_aligned(stacked.down[row])
        got = stacked.expert(row)
        assert torch.equal(got.gate, w.gate) and torch.equal(got.up, w.up) and torch.equal(got.down, w.down)


def test_ensure_aligned_copies_only_what_starts_elsewhere():
    buffer = aligned_empty((40,), torch.float32)
    assert is_aligned(buffer)
    aligned = buffer[16:32]  # 64 bytes in
    assert ensure_aligned(aligned) is aligned
    shifted = buffer[2:18].view(4, 4)  # 8 bytes in: where safetensors may put a tensor
    copy = ensure_aligned(shifted)
    assert is_aligned(copy) and torch.equal(copy, shifted) and copy.shape == (4, 4)


def test_aligned_empty_pads_past_an_allocator_that_aligns_less(monkeypatch):
    real_empty = torch.empty

    def eight_bytes_in(shape, dtype, device):  # an allocator aligning to 8 bytes only
        if isinstance(shape, int):
            shape = (shape,)
        numel = int(torch.tensor(shape).prod())
        block = real_empty(numel + 16, dtype=dtype, device=device)
        return block[8 // dtype.itemsize : 8 // dtype.itemsize + numel].view(shape)

    monkeypatch.setattr(torch, "empty", lambda shape, dtype, device: eight_bytes_in(shape, dtype, device))
    tensor = aligned_empty((3, 5), torch.float32)
    assert tensor.shape == (3, 5) and is_aligned(tensor) and tensor.is_contiguous()
