"""engine/decode_graphs.py on a CPU, with a capturer that replays by running the step again.

Everything but the CUDA capture itself is exercised: batch buckets and padding into free cache rows,
static inputs refilled each step, span buckets, recapture after the KV cache grows, rows freed as
sequences finish, and graphs dropped with their provider. Replayed steps must give what eager steps
give (greedy tokens identical, log-probabilities within float32 rounding: padding changes the matmul
shapes). tests/test_decode_graphs_gpu.py checks real graphs on a GPU."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.engine.decode_graphs import DecodeGraphs

CPU = torch.device("cpu")
# 3 and 5 sequences pad to buckets 4 and 8; 30 + 40 tokens cross the 64-position span and grow the cache
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
                output.copy_(step())

        return SimpleNamespace(replay=replay), output

    def staging(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(like)

    def event(self):
        return SimpleNamespace(record=lambda: None, synchronize=lambda: None)


def _graphed(directory) -> tuple[LLM, EagerReplay]:
    llm = LLM(directory, device="cpu", progress=False)
    runner = llm.engine.runner
    capturer = EagerReplay()
    runner.graphs = DecodeGraphs(runner.model, runner.cache, CPU, capturer)
    llm.experts = llm.experts.restacked()  # what the loader gives on a GPU
    return llm, capturer


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_replayed_steps_equal_eager_steps(checkpoint_factory, batch):
    directory, _ = checkpoint_factory("qwen3_moe")
    llm, capturer = _graphed(directory)
    eager = LLM(directory, device="cpu", progress=False)
    # different lengths, so sequences leave the batch (and their cache rows) at different steps
    params = [SamplingParams(max_tokens=40 - 7 * i, temperature=0.0, ignore_eos=True, logprobs=2) for i in range(batch)]
    ours, want = llm.generate(PROMPTS[:batch], params), eager.generate(PROMPTS[:batch], params)
    for a, b in zip(ours, want):
        assert a.token_ids == b.token_ids
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            assert lp_a.keys() == lp_b.keys() and max(abs(lp_a[t] - lp_b[t]) for t in lp_a) <= 1e-5
    assert capturer.replays == 39  # every decode step replayed a graph (the longest request has 39)
    # the span went from 64 to 128 positions and the cache grew under the graphs: captured again
    assert capturer.captures >= 2 and llm.engine.runner.cache.capacity >= 128


def test_steps_that_do_not_fit_run_eagerly(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe")
    llm, capturer = _graphed(directory)
    unstacked = LLM(directory, device="cpu", progress=False).experts  # a mapped checkpoint: not stacked
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPTS[:2], params, experts=unstacked)
    assert capturer.captures == 0
    llm.generate(PROMPTS[:2], params)
    assert capturer.captures > 0


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
