"""Compiled CPU decode steps (engine/compiled_decode.py) through the engine, against eager steps.

The compiled step runs inductor's generated code and BLAS in other orders than the eager ops, so its
logits equal the eager step's within float32 rounding, not bit for bit; greedy tokens, which only move
when two logits tie within that rounding, are compared exactly. One compiled region per (batch bucket,
span, provider kind): a batch of 3 pads to bucket 4, a longer generation crosses into the next span, and
an offloading provider reaches its experts through the host from inside the compiled step.
"""

from __future__ import annotations

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.engine.direct_graph import DirectGraph

PROMPTS = [[5, 6, 7], [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 11], list(range(30, 50))]
# 60 new tokens: the longest prompt (20) crosses from the 64-position span into the 128-position one
GREEDY = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
# 40: the longest prompt stays in the 64-position span (each span is a compile of its own, ~10 s cold)
GREEDY_ONE_SPAN = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
RUN_BESIDE_THE_SESSION = True  # its inductor compiles run on the other core (tests/side_run.py)
RAW = {"default": {"codec": "raw"}}
SZP = {"default": {"codec": "szp", "mode": "rel", "error_bound": 1e-4}}
TOLERANCE = 1e-5  # float32 rounding over a tiny model's layers, logits O(1)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe", num_hidden_layers=2, num_experts=8, seed=5)
    return directory


@pytest.fixture(autouse=True)
def store_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path / "cache"))


def _tokens(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, params)]


def test_compiled_steps_match_eager_steps(checkpoint, capfd):
    eager = LLM(checkpoint, device="cpu", enforce_eager=True, progress=False)
    compiled = LLM(checkpoint, device="cpu", enforce_eager=False)
    assert compiled.engine.runner.compiled is not None and eager.engine.runner.compiled is None
    capfd.readouterr()
    assert _tokens(compiled) == _tokens(eager)
    progress = capfd.readouterr().err
    assert "compiling the CPU decode step for batches up to 4 reading 64 positions" in progress
    assert "reading 128 positions" in progress  # the longest sequence crossed into the next span
    keys = set(compiled.engine.runner.compiled._steps)
    assert {key[:2] for key in keys} >= {(4, 4), (4, 8)}
    # every step's graph is called directly (engine/direct_graph.py), not back through torch.compile, and
    # inductor's code itself, past AOT autograd's wrappers
    steps = compiled.engine.runner.compiled._steps.values()
    assert all(isinstance(step, DirectGraph) and step.code is not None for step in steps)
    # the same shapes again: no new compile, no progress line
    assert _tokens(compiled) == _tokens(eager)
    assert set(compiled.engine.runner.compiled._steps) == keys
    assert "compiling" not in capfd.readouterr().err

    # one step's logits: compiled within float32 rounding of eager, batch of 3 padded to 4
    engines = [llm.engine for llm in (eager, compiled)]
    seqs = []
    for engine in engines:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        batch = [engine.make_sequence(p, params) for p in PROMPTS]
        for seq in batch:
            engine.submit(seq, eager.experts if engine is engines[0] else compiled.experts)
        engine.step()  # the prefill
        seqs.append(batch)
    logits = [engine.runner.decode(batch, batch[0].experts) for engine, batch in zip(engines, seqs)]
    assert logits[1].shape == (3, compiled.config.vocab_size)
    assert (logits[0] - logits[1]).abs().max().item() <= TOLERANCE


def _logprobs(llm: LLM, prompts) -> list:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    return [[list(step.items()) for step in o.logprobs] for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("policy,cache,held", [(RAW, "50%", True), (RAW, "25%", False), (SZP, "50%", True),
                                               (SZP, "25%", False)])
def test_offloaded_experts_from_a_compiled_step(checkpoint, policy, cache, held):
    # 2 MoE layers of 8 experts, top-2, stored in float32 like the compute dtype. A 50% cache (8 slots) holds
    # the 8 experts a padded batch of 4 may route to, so the step can compute them from the held slots
    # (host_expert_slots) in the compiled step; a 25% cache (4 slots) cannot, and the step reaches them
    # through host_routed_experts; a batch of 1 fits either. The resident model computes every step from its
    # stack, and raw offloading equals it bit for bit either way.
    resident = LLM(checkpoint, device="cpu", enforce_eager=False, progress=False)
    offloaded = LLM(checkpoint, device="cpu", policy=policy, expert_cache=cache, enforce_eager=False, progress=False)
    if policy is RAW:
        for prompts in (PROMPTS, PROMPTS[:1]):
            assert _logprobs(offloaded, prompts) == _logprobs(resident, prompts)
    else:
        assert _tokens(offloaded, GREEDY_ONE_SPAN) == _tokens(resident, GREEDY_ONE_SPAN)
        _logprobs(offloaded, PROMPTS[:1])
    assert offloaded.offload.stats.misses > 0  # experts were loaded by the opaque op's fetches, not baked into the step
    steps = offloaded.engine.runner.compiled._steps
    assert {key[2] for key in steps} == {type(offloaded.experts)}
    assert all(isinstance(step, DirectGraph) and step.code is not None for step in steps.values())
    held_by_bucket = {key[0]: all(shape is not None for shape in key[4]) for key in steps}
    assert held_by_bucket == {4: held, 1: True}
    assert offloaded.experts.pinned_slots() == 0  # released after each step
    # the held slots' bookkeeping runs in C++ (offload/native_slots.py) where every layer's experts fit the pool
    assert offloaded.experts.slots_in_cpp == (policy is SZP and cache == "50%")
    assert {key[6] for key in steps} == {offloaded.experts.slots_in_cpp}


def test_enforce_eager_from_the_environment(checkpoint, monkeypatch):
    monkeypatch.setenv("MOESERVE_ENFORCE_EAGER", "1")
    assert LLM(checkpoint, device="cpu", progress=False).engine.runner.compiled is None
    monkeypatch.setenv("MOESERVE_ENFORCE_EAGER", "0")
    assert LLM(checkpoint, device="cpu", progress=False).engine.runner.compiled is not None
    # an explicit choice wins over the environment
    assert LLM(checkpoint, device="cpu", enforce_eager=True, progress=False).engine.runner.compiled is None


def test_cache_dir_is_per_cpu_capability(monkeypatch):
    from moeserve.engine import compiled_decode

    monkeypatch.setattr(compiled_decode, "_USER_CACHE_DIR", None)
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/xdg")
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert compiled_decode.cache_dir().name == f"torch-{torch.__version__}-{capability}"
    monkeypatch.setattr(compiled_decode, "_USER_CACHE_DIR", "/tmp/mine")
    assert str(compiled_decode.cache_dir()) == "/tmp/mine"


def test_a_failed_compile_falls_back_to_eager_steps(checkpoint, monkeypatch, capfd):
    eager = LLM(checkpoint, device="cpu", enforce_eager=True, progress=False)
    llm = LLM(checkpoint, device="cpu", enforce_eager=False, progress=False)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(torch, "compile", broken)
    assert _tokens(llm) == _tokens(eager)
    err = capfd.readouterr().err
    assert "compiling the CPU decode step failed (RuntimeError: no C++ compiler found); decode steps run eagerly" in err
    assert err.count("failed") == 1  # said once; later steps do not try again
    assert llm.engine.runner.compiled.failure is not None and not llm.engine.runner.compiled._steps


def test_bfloat16_compiled_steps_round_like_eager_steps(checkpoint_factory):
    # inductor would fuse a bf16 step's elementwise chains in float32; emulating the eager casts keeps its
    # greedy tokens with the eager step's (they parted on this model without it)
    directory, _ = checkpoint_factory("qwen3_moe", dtype=torch.bfloat16)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    runs = [
        [o.token_ids for o in LLM(directory, device="cpu", enforce_eager=eager, progress=False).generate(PROMPTS, params)]
        for eager in (True, False)
    ]
    assert runs[0] == runs[1]
