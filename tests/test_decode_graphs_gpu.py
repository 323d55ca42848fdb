"""CUDA graphs of decode steps (engine/decode_graphs.py) against eager steps, on a GPU; skipped without CUDA.

The graph replays exactly the kernels the eager step launches, over padded batches, so greedy tokens must
be identical and logits equal within float32 rounding. A raw-offloaded model replays a chain of segment
graphs with its experts loaded and run eagerly between them, and must equal the resident model's
whole-step graphs bit for bit (tokens and log-probabilities), in float32 and bfloat16. Batches of 3 and 5 pad up to 4 and 8, and 40 tokens cross a span bucket (64 → 128)."""

from __future__ import annotations

import pytest
import torch

from moeserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[5, 6, 7] * 10, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 11], [1, 2], [42] * 6, [7] * 40]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=1)


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_graph_replay_equals_eager(checkpoint_factory, batch):
    directory, _ = checkpoint_factory("qwen3_moe")
    graphed = LLM(directory, device="cuda", dtype="float32", progress=False)
    eager = LLM(directory, device="cuda", dtype="float32", enforce_eager=True, progress=False)
    assert graphed.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    prompts = PROMPTS[:batch]
    ours, theirs = graphed.generate(prompts, GREEDY), eager.generate(prompts, GREEDY)
    assert graphed.engine.runner.graphs._graphs, "no decode step replayed a graph"
    for a, b in zip(ours, theirs):
        assert a.token_ids == b.token_ids
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            assert lp_a.keys() == lp_b.keys()
            assert max(abs(lp_a[t] - lp_b[t]) for t in lp_a) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_raw_offload_equals_graphed_resident(checkpoint_factory, dtype):
    directory, _ = checkpoint_factory("mixtral")
    resident = LLM(directory, device="cuda", dtype=dtype, progress=False)
    offloaded = LLM(directory, device="cuda", dtype=dtype, policy={"default": {"codec": "raw"}},
                    expert_cache="50%", progress=False)
    prompts = PROMPTS[:3]
    want = [(o.token_ids, o.logprobs) for o in resident.generate(prompts, GREEDY)]
    assert [(o.token_ids, o.logprobs) for o in offloaded.generate(prompts, GREEDY)] == want  # bit for bit
