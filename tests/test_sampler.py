"""The device sampler: seeded rows independent of their batch, the filtered distribution against a
per-row reference (exactly, and by drawing from it), greedy rows exact, one device→host transfer per step."""

from __future__ import annotations

import math

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.engine.sampler import filter_ranked, sample, token_logprobs
from moeserve.engine.sequence import Sequence

CPU = torch.device("cpu")
DEVICES = [CPU, pytest.param(torch.device("cuda"), marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]


def make_seq(params: SamplingParams, device: torch.device, seq_id: int = 0) -> Sequence:
    generator = None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed)
    return Sequence(seq_id, [1], params, max_len=64, detokenizer=None, generator=generator)


def reference_probs(row: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """One row, the plain way: temperature, then the top-k tokens (ties at the k-th kept), then the smallest
    most-likely-first prefix whose mass reaches top_p; renormalised over what is kept."""
    scaled = [x / temperature for x in row]
    order = sorted(range(len(row)), key=lambda i: -scaled[i])
    keep = list(order)
    if top_k > 0:
        kth = scaled[order[min(top_k, len(row)) - 1]]
        keep = [i for i in order if scaled[i] >= kth]
    top = max(scaled)
    weights = {i: math.exp(scaled[i] - top) for i in keep}
    total = sum(weights.values())
    if top_p < 1:
        prefix, mass = [], 0.0
        for i in keep:
            if mass >= top_p:
                break
            prefix.append(i)
            mass += weights[i] / total
        keep = prefix
    total = sum(weights[i] for i in keep)
    return [weights[i] / total if i in keep else 0.0 for i in range(len(row))]


FILTERS = [  # (temperature, top_k, top_p)
    (1.0, -1, 1.0),
    (0.7, 3, 1.0),
    (1.3, -1, 0.8),
    (0.8, 5, 0.9),
    (1.0, 100, 0.5),  # top_k past the vocabulary
    (1.0, 2, 1e-6),  # only the top token
]


def test_filtering_equals_a_per_row_reference():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(len(FILTERS), 12, generator=generator) * 2  # [S, V]
    logits[1] = torch.tensor([1.0, 3.0, 1.0, 1.0] + [0.0] * 8)  # ties at the 3rd: all three stay
    temperature = torch.tensor([[f[0]] for f in FILTERS])
    top_k = torch.tensor([[float(max(f[1], 0))] for f in FILTERS])
    top_p = torch.tensor([[f[2]] for f in FILTERS])
    ranked, order = torch.sort(logits / temperature, dim=-1, descending=True, stable=True)
    by_rank = filter_ranked(ranked, top_k, top_p).softmax(dim=-1)  # [S, V]
    probs = torch.zeros_like(by_rank).scatter(1, order, by_rank)  # back to vocabulary order
    for row, (t, k, p) in enumerate(FILTERS):
        expected = torch.tensor(reference_probs(logits[row].tolist(), t, k, p))
        assert torch.equal(probs[row] > 0, expected > 0), (t, k, p)
        torch.testing.assert_close(probs[row], expected, atol=1e-6, rtol=1e-5)
    assert (probs[1] > 0).sum() == 4  # the top token and the three tied at the 3rd


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,top_k,top_p", FILTERS[:4])
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p, device):
    """20,000 unseeded rows (the engine generator, one batched draw) and 3,000 rows with their own seeds,
    counted against the reference; chi-square p-value above 1e-3 (fixed seeds: the same counts every run)."""
    logits = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.0, -0.5, -1.0])  # [V]
    expected = torch.tensor(reference_probs(logits.tolist(), temperature, top_k, top_p), dtype=torch.float64)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    unseeded = [make_seq(SamplingParams(**options), device) for _ in range(20_000)]
    seeded = [make_seq(SamplingParams(seed=s, **options), device) for s in range(3_000)]
    for seqs in (unseeded, seeded):
        rows = logits.to(device).expand(len(seqs), -1)  # [N, V]
        tokens = sample(rows, seqs, torch.Generator(device=device).manual_seed(7)).tokens
        counts = torch.bincount(torch.tensor(tokens), minlength=len(logits)).double()
        assert counts[expected == 0].sum() == 0  # never a filtered token
        kept = expected > 0
        want = expected[kept] * len(seqs)
        chi2 = float(((counts[kept] - want) ** 2 / want).sum())
        dof = int(kept.sum()) - 1
        p_value = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))
        assert p_value > 1e-3, (counts.tolist(), want.tolist())


def _run_rows(logits_per_step: list[torch.Tensor], params: list[SamplingParams], device, engine_seed=0):
    """Sample `len(logits_per_step)` steps for a batch; one generator per seeded row, as the engine does."""
    seqs = [make_seq(p, device, i) for i, p in enumerate(params)]
    default = torch.Generator(device=device).manual_seed(engine_seed)
    return [sample(step.to(device), seqs, default).tokens for step in logits_per_step]


@pytest.mark.exact
@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_draw_the_same_alone_and_in_a_batch_of_eight(device):
    generator = torch.Generator().manual_seed(1)
    steps = [torch.randn(8, 50, generator=generator) for _ in range(6)]  # [B, V] per step
    params = [
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=10, top_p=0.9, seed=12),
        SamplingParams(temperature=1.2),
        SamplingParams(temperature=1.0, top_p=0.7, seed=13),
        SamplingParams(temperature=0.0, top_k=5),
        SamplingParams(temperature=0.5, top_k=3),
    ]
    batched = _run_rows(steps, params, device)
    again = _run_rows(steps, params, device, engine_seed=5)  # other unseeded draws around them
    for row, p in enumerate(params):
        alone = _run_rows([s[row : row + 1] for s in steps], [p], device, engine_seed=row + 100)
        column = [tokens[row] for tokens in batched]
        if p.seed is not None or p.greedy:
            assert column == [t[0] for t in alone] == [tokens[row] for tokens in again]
        if p.greedy:
            assert column == [int(s[row].argmax()) for s in steps]


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_of_mixed_rows_equal_log_softmax(device):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 30, generator=generator)  # [B, V]
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=1.0, seed=4),
        SamplingParams(temperature=1.0, seed=5, logprobs=0),
        SamplingParams(temperature=0.0, logprobs=1),
    ]
    seqs = [make_seq(p, device, i) for i, p in enumerate(params)]
    out = sample(logits.to(device), seqs, torch.Generator(device=device).manual_seed(0))
    reference = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    for row, p in enumerate(params):
        if p.logprobs is None:
            continue
        entry = out.logprobs[row]
        token = out.tokens[row]
        assert next(iter(entry)) == token and math.isclose(entry[token], reference[row, token].item(), abs_tol=1e-6)
        top = reference[row].topk(p.logprobs)
        assert set(entry) == {token, *top.indices.tolist()}
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert math.isclose(entry[t], v, abs_tol=1e-6)
    assert token_logprobs(logits, out.tokens, [p.logprobs for p in params]) == out.logprobs


@pytest.mark.exact
def test_engine_seeded_outputs_alone_equal_inside_a_mixed_batch_of_eight(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe")
    llm = LLM(directory, device="cpu")
    prompts = [[7, 8, 9], [3], [100, 101, 102, 103], [20, 21], [9, 9, 9], [50], [60, 61, 62], [1, 2]]
    options = dict(max_tokens=8, ignore_eos=True)
    params = [
        SamplingParams(temperature=1.0, seed=1, **options),
        SamplingParams(temperature=1.0, **options),
        SamplingParams(temperature=0.0, **options),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=2, **options),
        SamplingParams(temperature=1.0, **options),
        SamplingParams(temperature=1.1, top_p=0.8, seed=3, **options),
        SamplingParams(temperature=0.0, **options),
        SamplingParams(temperature=1.0, seed=4, **options),
    ]
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    for prompt, p, tokens in zip(prompts, params, batched):
        if p.seed is not None or p.greedy:
            assert llm.generate([prompt], p)[0].token_ids == tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("logprobs", [None, 2])
def test_one_device_to_host_transfer_per_step_on_cuda(logprobs):
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    logits = torch.randn(8, 32000, device=device)  # [B, V]
    params = [SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=i, logprobs=logprobs) for i in range(4)]
    params += [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)] * 2
    seqs = [make_seq(p, device, i) for i, p in enumerate(params)]
    default = torch.Generator(device=device).manual_seed(0)
    sample(logits, seqs, default)  # warm-up: first-use allocations
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sample(logits, seqs, default)
        torch.cuda.synchronize()
    to_host = [e.name for e in prof.events() if "DtoH" in e.name]
    assert len(to_host) == 1, to_host
