"""gpt_oss offloaded: its experts (biases resident, matrices through the provider) are exact under
every budget, and policies, groups and `moeserve compress` work on it unchanged."""

from __future__ import annotations

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.models.gpt_oss import GptOssMoeBlock
from moeserve.offload.cache import SlotPool

PROMPTS = [[5, 6, 7], [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 11], list(range(30, 50))]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
RAW = {"default": {"codec": "raw"}}
LOSSY = {
    "default": {"codec": "szp", "mode": "rel", "error_bound": 1e-2},
    "rules": [{"layers": "deep", "codec": "int8"}],
}


@pytest.fixture(autouse=True)
def store_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    directory, _ = checkpoint_factory("gpt_oss", num_hidden_layers=4, num_local_experts=8, seed=3)
    return directory


def _run(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)], llm.score(PROMPTS[1])


def _budgets(llm):
    """One layer's top-k, one slot more (a miss evicts within the step), half of the experts."""
    c = llm.config
    slot = SlotPool.slot_nbytes(c.hidden_size, c.moe_intermediate_size, c.dtype)
    return [c.top_k * slot, (c.top_k + 1) * slot, "50%"]


@pytest.mark.exact
def test_raw_policy_is_bit_identical_to_resident_under_every_budget(checkpoint):
    resident = LLM(checkpoint, device="cpu")
    assert all(resident.experts.expert(0, e).gate_up is not None for e in range(8))  # fused, as in a slot
    tokens, logits = _run(resident)
    for budget in _budgets(resident):
        llm = LLM(checkpoint, device="cpu", policy=RAW, expert_cache=budget, progress=False)
        got_tokens, got_logits = _run(llm)
        assert got_tokens == tokens, budget
        assert torch.equal(got_logits, logits), budget


@pytest.mark.exact
@pytest.mark.parametrize("compute_dtype", [None, "float32"])
def test_raw_policy_is_bit_identical_on_a_bf16_checkpoint(checkpoint_factory, compute_dtype):
    directory, _ = checkpoint_factory("gpt_oss", dtype=torch.bfloat16, seed=5)
    resident = LLM(directory, device="cpu", dtype=compute_dtype)
    tokens, logits = _run(resident)
    smallest = _budgets(resident)[0]
    llm = LLM(directory, device="cpu", dtype=compute_dtype, policy=RAW, expert_cache=smallest, progress=False)
    got_tokens, got_logits = _run(llm)
    assert got_tokens == tokens and torch.equal(got_logits, logits)


@pytest.mark.exact
def test_lossy_policy_is_identical_under_every_budget(checkpoint):
    unlimited = LLM(checkpoint, device="cpu", policy=LOSSY, progress=False)
    # groups split the 4 MoE layers 1/2/1: only layer 3 is deep, so it alone is int8
    assert {b.codec for p in (unlimited.offload.store.experts[(3, e)] for e in range(8)) for b in p.blobs} == {"int8"}
    assert {b.codec for p in (unlimited.offload.store.experts[(2, e)] for e in range(8)) for b in p.blobs} == {"szp"}
    tokens, logits = _run(unlimited)
    for budget in _budgets(unlimited)[::2]:  # the smallest cache and half of the experts
        got_tokens, got_logits = _run(LLM(checkpoint, device="cpu", policy=LOSSY, expert_cache=budget, progress=False))
        assert got_tokens == tokens and torch.equal(got_logits, logits), budget


def test_prediction_names_exactly_the_routed_experts(checkpoint):
    llm = LLM(checkpoint, device="cpu")
    blocks = [m for m in llm.model.modules() if isinstance(m, GptOssMoeBlock)]
    assert len(blocks) == 4
    generator = torch.Generator().manual_seed(0)
    for block in blocks:
        x = torch.randn(7, llm.config.hidden_size, generator=generator)  # [T, D]
        weights, ids = block.route(x)
        assert set(block.router_module.select(x).flatten().tolist()) == set(ids.flatten().tolist())
        assert torch.allclose(weights.sum(dim=-1), torch.ones(7))  # softmax over the k chosen


def test_compressed_directory_serves_the_same_outputs(checkpoint, tmp_path):
    import yaml

    from moeserve.cli import main

    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(LOSSY))
    out = tmp_path / "compressed"
    assert main(["compress", "--model", str(checkpoint), "--policy", str(policy), "--out", str(out)]) == 0
    served = LLM(out, device="cpu", expert_cache="25%", progress=False)
    original = LLM(checkpoint, device="cpu", policy=LOSSY, progress=False)
    assert _run(served)[0] == _run(original)[0]
