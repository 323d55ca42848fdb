"""Timing for bench/throughput.py: the link bandwidth, and one timed request batch on a provider.

In:  an `LLMEngine` (the model and its KV cache), an expert provider with its `OffloadStats` (None for
     all-resident experts), prompts of token ids, the number of tokens to generate.
Out: `Measurement`: time to first token (the prefill step), decode time per step, and the offloading
     counters of the decode steps alone, from which `row` derives tokens/s, bytes per token and the
     physical bound.

Every clock read is preceded by a device synchronize, so GPU work queued by a step is inside its time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moeserve.engine.llm_engine import LLMEngine
from moeserve.engine.sampling_params import SamplingParams
from moeserve.offload.stats import OffloadStats


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def link_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of the path every offloaded byte takes: pinned host → device on a GPU (one copy of
    `nbytes`, timed with CUDA events); on a CPU its analogue, a memcpy between two host tensors."""
    if device.type == "cuda":
        source = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
        target = torch.empty(nbytes, dtype=torch.uint8, device=device)
        target.copy_(source, non_blocking=True)  # warm-up: first-touch and driver setup
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000.0)
        return nbytes / best
    source = torch.ones(nbytes, dtype=torch.uint8)
    target = torch.zeros(nbytes, dtype=torch.uint8)  # both touched, so no page faults are timed
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


@dataclass
class Measurement:
    batch: int
    ttft_s: float  # the prefill step: every sequence's first token
    decode_s: float  # the decode steps after it
    decode_steps: int
    stats: OffloadStats | None  # counters of the decode steps only; None for all-resident experts

    @property
    def decode_tokens(self) -> int:
        return self.batch * self.decode_steps


def timed_request(
    engine: LLMEngine,
    provider,
    stats: OffloadStats | None,
    prompts: list[list[int]],
    new_tokens: int,
    seed: int,
    device: torch.device,
) -> Measurement:
    """Submit every prompt at once on `provider`, time the prefill step, then the decode steps."""
    # Sampled, not greedy: a random model's greedy output soon repeats one token, and so one routing,
    # which would make every cache look perfect. The seed makes every configuration draw alike.
    params = [
        SamplingParams(max_tokens=1 + new_tokens, temperature=1.0, seed=seed + i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    seqs = [engine.make_sequence(p, sp) for p, sp in zip(prompts, params)]
    for seq in seqs:
        engine.submit(seq, provider)
    synchronize(device)
    start = time.perf_counter()
    engine.step()  # prefill: all prompts fit one step (the engine's token budget is sized for it)
    synchronize(device)
    first = time.perf_counter()
    if any(not seq.output_ids for seq in seqs):
        raise RuntimeError("the prefill step did not produce every sequence's first token; raise the token budget")
    if stats is not None:
        stats.reset()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    synchronize(device)
    end = time.perf_counter()
    collect_timing = getattr(getattr(provider, "filler", None), "collect_timing", None)
    if collect_timing is not None:  # the GPU pipeline's timeline events, all finished after the sync
        collect_timing()
    return Measurement(len(prompts), first - start, end - first, steps, stats)


def row(config: str, budget: str, m: Measurement, bandwidth: float) -> dict:
    """One table row: throughput, latency and the offloading counters per output token."""
    tokens = m.decode_tokens
    result = {
        "config": config,
        "budget": budget,
        "batch": m.batch,
        "tokens_per_s": tokens / m.decode_s,
        "tpot_ms": 1000 * m.decode_s / m.decode_steps,  # every sequence gets one token per step
        "ttft_s": m.ttft_s,
        "bytes_per_token": 0.0,
        "hit_rate": None,
        "prefetch_accuracy": None,
        "wait_ms_per_token": 0.0,
        "decode_ms_per_token": 0.0,
        # the GPU pipeline's timeline (zero on a CPU): copy engine busy, compute stalled on a decode
        "copy_ms_per_token": 0.0,
        "compute_wait_ms_per_token": 0.0,
        "prefetch_wasted_bytes_per_token": 0.0,
        "prefetch_by_distance": {},  # MoE layers ahead → [guesses issued, guesses used]
        "bound_tokens_per_s": None,
        "fraction_of_bound": None,
    }
    if m.stats is not None:
        s = m.stats
        moved = s.bytes_transferred / tokens
        result.update(
            bytes_per_token=moved,
            hit_rate=s.hit_rate,
            prefetch_accuracy=s.prefetches_used / s.prefetches_issued if s.prefetches_issued else None,
            wait_ms_per_token=1000 * s.wait_seconds / tokens,
            decode_ms_per_token=1000 * s.decode_seconds / tokens,
            copy_ms_per_token=1000 * s.copy_seconds / tokens,
            compute_wait_ms_per_token=1000 * s.compute_wait_seconds / tokens,
            prefetch_wasted_bytes_per_token=s.prefetch_bytes_wasted / tokens,
            prefetch_by_distance={
                d: [issued, s.prefetches_used_at.get(d, 0)] for d, issued in sorted(s.prefetches_issued_at.items())
            },
        )
        needed = s.needed_bytes / tokens
        if needed:
            # The physical bound: were the link the only cost, the bytes of the experts each token used that
            # were not cached before they were wanted, at the measured bandwidth. Wrong guesses move bytes
            # too but are not in it: they count against the pipeline, never for it.
            result["bound_tokens_per_s"] = bandwidth / needed
            result["fraction_of_bound"] = result["tokens_per_s"] / result["bound_tokens_per_s"]
    return result
