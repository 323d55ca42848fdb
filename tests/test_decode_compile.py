"""The decode step is free of host syncs and of shape-dependent Python: it compiles whole.

For every family, a decode step over three sequences of different lengths (so masks matter) runs
under `torch.compile(fullgraph=True)`, which fails on any graph break (a `.tolist()`, a `.item()`, a
data-dependent branch), and its logits equal the eager step's within float32 rounding. The eager step
reaches experts through the host (the CPU path); the compiled one routes on the device over the
stacked experts (layers/moe.py), so the two paths are checked against each other too. Later steps of
the same span bucket must reuse the compiled graph: the step's shapes depend only on the batch size
and the bucket, never on the exact lengths.

Every family compiles with the `aot_eager` backend (dynamo's capture and AOT autograd's functional
graph, the parts that reject host syncs); one also through inductor, which generates C++ (slower to build).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from conftest import FAMILY_CONFIGS
from moeserve import LLM, SamplingParams

RUN_BESIDE_THE_SESSION = True  # its inductor compiles run on the other core (tests/side_run.py)
PROMPTS = [[5, 6, 7], [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 11], [1, 2]]
# float32 rounding, accumulated over the layers of a tiny model whose logits are O(1)
TOLERANCE = 1e-5


def _prefilled(llm: LLM, experts):
    """The engine's sequences after their prefill step: each has one token to decode."""
    engine = llm.engine
    seqs = [engine.make_sequence(p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)) for p in PROMPTS]
    for seq in seqs:
        engine.submit(seq, experts)
    engine.step()
    return sorted(seqs, key=lambda s: s.num_tokens)


def _advance(seqs, logits: torch.Tensor) -> None:
    """Append each sequence's greedy token, as the engine would after a decode step."""
    for seq, token in zip(seqs, logits.argmax(dim=-1).tolist()):
        seq.num_cached += 1
        seq.output_ids.append(token)


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_decode_step_compiles_whole_and_matches_eager(checkpoint_factory, model_type):
    directory, _ = checkpoint_factory(model_type)
    llm = LLM(directory, device="cpu", progress=False)
    experts = llm.experts.restacked()
    model, runner = llm.engine.runner.model, llm.engine.runner
    seqs = _prefilled(llm, experts)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(3):
        ids, ctx = runner.decode_inputs(seqs)
        eager = model(ids, ctx, experts)  # [B, V]
        ids, ctx = runner.decode_inputs(seqs)  # a fresh context: masks are cached per context
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = compiled(ids, ctx, experts)
        assert (got - eager).abs().max().item() <= TOLERANCE, f"step {step}"
        _advance(seqs, eager)


def test_decode_step_compiles_through_inductor(checkpoint_factory, tmp_path, monkeypatch):
    # A cache of its own: inductor's cache key leaves out ATEN_CPU_CAPABILITY, so code generated for
    # AVX-512 by an earlier run would be reused, and fail to build, under ATEN_CPU_CAPABILITY=default.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    directory, _ = checkpoint_factory("qwen3_moe")
    llm = LLM(directory, device="cpu", progress=False)
    experts = llm.experts.restacked()
    model, runner = llm.engine.runner.model, llm.engine.runner
    seqs = _prefilled(llm, experts)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    ids, ctx = runner.decode_inputs(seqs)
    eager = model(ids, ctx, experts)
    ids, ctx = runner.decode_inputs(seqs)
    assert (compiled(ids, ctx, experts) - eager).abs().max().item() <= TOLERANCE
