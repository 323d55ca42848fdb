"""engine/decode_graphs.py on a CPU, with a capturer that replays by running the step again.

Everything but the CUDA capture itself is exercised: batch buckets and padding rows (which write the
null block), static inputs and block tables refilled each step, span buckets, sequences leaving the batch
as they finish, steps over some of the running sequences, graphs dropped with their provider, and chains of segment graphs with the routed
experts run eagerly between them (offloaded and unstacked providers). Replayed steps must give what
eager steps give (greedy tokens identical, log-probabilities within float32 rounding: padding changes
the matmul shapes). tests/test_decode_graphs_gpu.py checks real graphs on a GPU."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.engine.decode_graphs import DecodeGraphs
from moeserve.layers import cpu_gemm

CPU = torch.device("cpu")
# 3 and 5 sequences pad to buckets 4 and 8; 30 + 40 tokens cross the 64-position span bucket
PROMPTS = [[5, 6, 7] * 10, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 11], [1, 2], [42] * 6, [7] * 25]


class EagerReplay:
    """Stands in for CudaCapturer: 'capture' runs the step once (as the CUDA warm-up does), a replay runs
    it again into the same output tensor."""

    def __init__(self):
        self.captures = self.replays = 0

    def capture(self, step):
        self.captures += 1
        output = step()

        def replay():
            self.replays += 1
            with torch.inference_mode():  # the step's output is an inference tensor, as a graph's would be
                _copy_tensors(output, step())

        return SimpleNamespace(replay=replay), output

    def staging(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(like)

    def event(self):
        return SimpleNamespace(record=lambda: None, synchronize=lambda: None)


def _copy_tensors(dst, src) -> None:
    """Copy every tensor of `src` into the same place of `dst` (a tensor, a Segment, tuples and lists of them)."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _copy_tensors(d, s)
    elif dst is not None and not isinstance(dst, int):
        for name in vars(dst):
            _copy_tensors(getattr(dst, name), getattr(src, name))


def _graphed(directory, **options) -> tuple[LLM, EagerReplay]:
    llm = LLM(directory, device="cpu", progress=False, **options)
    runner = llm.engine.runner
    capturer = EagerReplay()
    runner.graphs = DecodeGraphs(runner.model, runner, CPU, capturer)
    if llm.offload is None:
        llm.experts = llm.experts.restacked()  # what the loader gives on a GPU
    return llm, capturer


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_replayed_steps_equal_eager_steps(checkpoint_factory, batch):
    directory, _ = checkpoint_factory("qwen3_moe")
    llm, capturer = _graphed(directory)
    eager = LLM(directory, device="cpu", progress=False)
    # different lengths, so sequences leave the batch (and return their blocks) at different steps
    params = [SamplingParams(max_tokens=40 - 7 * i, temperature=0.0, ignore_eos=True, logprobs=2) for i in range(batch)]
    ours, want = llm.generate(PROMPTS[:batch], params), eager.generate(PROMPTS[:batch], params)
    for a, b in zip(ours, want):
        assert a.token_ids == b.token_ids
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            assert lp_a.keys() == lp_b.keys() and max(abs(lp_a[t] - lp_b[t]) for t in lp_a) <= 1e-5
    assert capturer.replays == 39  # every decode step replayed a graph (the longest request has 39)
    # the span went from 64 to 128 positions (4 to 8 blocks of 16): captured again
    spans = {key[1] for key in llm.engine.runner.graphs._graphs}
    assert {4, 8} <= spans


def test_raw_offload_replaying_segment_chains_equals_resident_replays(checkpoint_factory):
    """Offloaded experts run eagerly between segment graphs. With the raw policy the tokens equal the
    resident model's whole-step replays, and so do the log-probabilities, bit for bit where the experts'
    matmuls do not depend on the rows beside them: the CPU GEMM kernel's (moeserve._cpu_gemm) and the GPU's
    grouped GEMM (tests/test_decode_graphs_gpu.py). Without the extension a CPU computes the padded rows'
    experts with F.linear on the resident side only, whose matmuls round a row differently with the number
    of rows: there they agree within float32 rounding."""
    directory, _ = checkpoint_factory("qwen3_moe")
    resident, _ = _graphed(directory)
    # a forced depth: on a CPU (the stand-in capturer's device) the provider guesses only when told
    offloaded, capturer = _graphed(directory, policy={"default": {"codec": "raw"}}, expert_cache="50%", prefetch_depth=1)
    params = [SamplingParams(max_tokens=30 - 7 * i, temperature=0.0, ignore_eos=True, logprobs=2) for i in range(3)]
    want = resident.generate(PROMPTS[:3], params)
    tolerance = 0.0 if cpu_gemm.available(torch.float32) else 1e-5
    for a, b in zip(offloaded.generate(PROMPTS[:3], params), want):
        assert a.token_ids == b.token_ids
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            assert lp_a.keys() == lp_b.keys() and max(abs(lp_a[t] - lp_b[t]) for t in lp_a) <= tolerance
    moe_layers = len(offloaded.model.moe_layer_ids)
    assert capturer.replays == 29 * (moe_layers + 1)  # every decode step: one replay per segment
    assert offloaded.offload.stats.prefetches_issued > 0  # the segments' predictions reached the provider


def test_steps_over_some_running_sequences_replay_too(checkpoint_factory):
    """Two providers in one engine: each decode step covers only its own sequences. Block tables name any
    sequence's blocks, so those steps replay graphs as well, and give what an eager engine gives."""
    directory, _ = checkpoint_factory("qwen3_moe")
    llm, capturer = _graphed(directory)
    other = llm.experts.with_overrides({})  # the same experts, another provider (so another step group)
    engine, params = llm.engine, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    seqs = [engine.make_sequence(p, params) for p in PROMPTS[:2]]
    for seq, provider in zip(seqs, [llm.experts, other]):
        engine.submit(seq, provider)
    while engine.has_unfinished():
        engine.step()
    # every decode step of both: the stacked provider's whole step, the other's chain of segments
    assert capturer.replays == 5 + 5 * (len(llm.model.moe_layer_ids) + 1)
    assert {key[2] for key in llm.engine.runner.graphs._graphs} == {id(llm.experts), None}  # None: a chain
    want = LLM(directory, device="cpu", progress=False).generate(PROMPTS[:2], params)
    assert [seq.output_ids for seq in seqs] == [o.token_ids for o in want]


def test_a_freed_provider_takes_its_graphs_along(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe")
    llm, capturer = _graphed(directory)
    retired, llm.experts = llm.experts, None  # the provider's only reference is here
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), experts=retired)
    graphs = llm.engine.runner.graphs
    assert graphs._graphs
    del retired
    gc.collect()
    assert not graphs._graphs  # nothing kept the provider (or its experts) alive
