"""Guessing experts more than one MoE layer ahead: the depth rule, deep guesses issued and used,
exactness at every depth, and no more demand loads than guessing one layer ahead."""

from __future__ import annotations

import random

import pytest
import torch
from fake_streams import FakeStreams
from random_store import random_store

from moeserve import LLM, SamplingParams
from moeserve.offload.cache import ExpertCache, SlotPool
from moeserve.offload.gpu_filler import GpuSlotFiller
from moeserve.offload.lookahead import automatic_prediction_depth
from moeserve.offload.options import OffloadError, OffloadOptions
from moeserve.offload.provider import OffloadedExpertProvider
from moeserve.offload.stats import OffloadStats
from moeserve.offload.store import CompressedStore

RAW = {"default": {"codec": "raw"}}
PROMPTS = [[5, 6, 7], list(range(30, 50))]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def store_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    # 4 MoE layers of 8 experts, top-2: one token's working set is 8 slots.
    directory, _ = checkpoint_factory("qwen3_moe", num_hidden_layers=4, num_experts=8, seed=3)
    return directory


def _slots(checkpoint, n: int) -> int:
    """A budget in bytes of `n` expert slots."""
    c = LLM(checkpoint, device="cpu", policy=RAW, progress=False).config
    return n * SlotPool.slot_nbytes(c.hidden_size, c.moe_intermediate_size, c.dtype)


@pytest.mark.parametrize(
    "slots,width,depth",
    [
        (8, 2, 1),  # one step's working set, no spare: the next layer only
        (10, 2, 1),  # spare 2 = one layer of guesses
        (12, 2, 2),
        (14, 2, 3),
        (32, 2, 3),  # at most the 3 MoE layers after the first
        (20, 4, 1),  # a wider routing (a batch) needs more room per layer
        (24, 4, 2),
        (31, 8, 1),  # a prefill asks for every expert: no spare
    ],
)
def test_depth_is_the_spare_over_the_routing_width(slots, width, depth):
    assert automatic_prediction_depth(slots, moe_layers=4, experts_per_layer=8, width=width) == depth


def _gpu_provider(store, slots: int, **options) -> OffloadedExpertProvider:
    """A provider over the fake-stream GPU filler (a GPU's depth rule) with `slots` slots."""
    pool = SlotPool(slots, D, I, torch.float32, torch.device("cpu"))
    stats = OffloadStats()
    filler = GpuSlotFiller(pool, stats, max(p.nbytes for p in store.experts.values()), FakeStreams())
    return OffloadedExpertProvider(store, pool, ExpertCache(slots), filler, stats, TOP_K, **options)


def test_gpu_provider_depth_follows_the_budget_the_width_and_the_options(store):
    # 5 MoE layers, top-2: one step's working set is 10 slots
    assert [_gpu_provider(store, n).prediction_depth for n in (10, 12, 14, 16, 40)] == [1, 1, 2, 3, 4]
    assert _gpu_provider(store, 10, prefetch_depth=3).prediction_depth == 3
    assert _gpu_provider(store, 14, prefetch=False).prediction_depth == 0
    wide = _gpu_provider(store, 14)
    list(wide.fetch(0, list(range(EXPERTS))))  # a prefill's width: every expert of the layer
    assert wide.prediction_depth == 1
    list(wide.fetch(1, [0, 1]))
    assert wide.prediction_depth == 2


def test_cpu_provider_guesses_only_when_told(checkpoint):
    """On a CPU a guess costs the model's thread its bookkeeping and compute its decode, more than a right one
    saves (measured: OffloadedExpertProvider.prediction_depth): no guesses unless a depth is forced."""
    def provider(n: int, **options):
        return LLM(checkpoint, device="cpu", policy=RAW, expert_cache=_slots(checkpoint, n), progress=False,
                   **options).offload.provider

    assert provider(16).prediction_depth == 0  # the rule would say 3 here (test above)
    assert provider(8, prefetch_depth=3).prediction_depth == 3
    assert provider(8, prefetch_depth=1).prediction_depth == 1


def test_two_ahead_guesses_are_issued_and_used(checkpoint):
    llm = LLM(checkpoint, device="cpu", policy=RAW, expert_cache=_slots(checkpoint, 12), prefetch_depth=2,
              progress=False)
    assert llm.offload.provider.prediction_depth == 2
    llm.generate([PROMPTS[1]], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    stats = llm.offload.stats
    assert set(stats.prefetches_issued_at) == {1, 2}
    assert stats.prefetches_used_at.get(2, 0) > 0
    assert sum(stats.prefetches_issued_at.values()) == stats.prefetches_issued
    assert sum(stats.prefetches_used_at.values()) == stats.prefetches_used


@pytest.mark.exact
def test_raw_policy_is_bit_identical_to_resident_at_every_depth(checkpoint):
    resident = LLM(checkpoint, device="cpu")
    tokens = [o.token_ids for o in resident.generate(PROMPTS, GREEDY)]
    logits = resident.score(PROMPTS[1])
    for slots in (3, 12):
        for depth in (1, 2, 3):
            llm = LLM(checkpoint, device="cpu", policy=RAW, expert_cache=_slots(checkpoint, slots),
                      prefetch_depth=depth, progress=False)
            assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == tokens, (slots, depth)
            assert torch.equal(llm.score(PROMPTS[1]), logits), (slots, depth)


def test_prefetch_depth_option_is_checked():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(OffloadError, match="prefetch depth must be a positive number"):
            OffloadOptions(prefetch_depth=bad)
    with pytest.raises(OffloadError, match="prefetch turned off"):
        OffloadOptions(prefetch=False, prefetch_depth=2)


LAYERS, EXPERTS, TOP_K, D, I = 5, 8, 2, 16, 8


@pytest.fixture(scope="module")
def store() -> CompressedStore:
    return random_store(LAYERS, EXPERTS, D, I, RAW)


def _demand_loads(store, slots: int, depth: int, guesses_evict: bool, routing, predictions) -> OffloadStats:
    """Decode steps on the fake-stream pipeline (every fill done at once, so the counts are exact): each
    layer guesses the next `depth` layers from `predictions`, then fetches its routed experts."""
    streams, stats = FakeStreams(), OffloadStats()
    pool = SlotPool(slots, D, I, torch.float32, torch.device("cpu"))
    filler = GpuSlotFiller(pool, stats, max(p.nbytes for p in store.experts.values()), streams)
    filler.guesses_evict = guesses_evict  # True: the CPU filler's rule for the next layer's guess
    provider = OffloadedExpertProvider(store, pool, ExpertCache(slots), filler, stats, TOP_K, prefetch_depth=depth)
    for step, layers in enumerate(routing):
        for layer, experts in enumerate(layers):
            for ahead in range(1, min(provider.prediction_depth, LAYERS - 1 - layer) + 1):
                provider.prefetch(layer + ahead, predictions[step][layer][ahead])
            for _, weights in provider.fetch(layer, experts):
                streams.compute_reads([weights.gate, weights.up, weights.down])
    return stats


def test_guessing_further_ahead_loads_fewer_experts_on_demand(store):
    # One routing of 8 steps per routing width; a prediction k layers ahead names the routed experts with
    # probability 0.8 - 0.15 k, else random ones. Every budget whose rule allows depth >= 2 runs at depth
    # 1 and at that depth, with guesses that may evict (CPU) and that may not (GPU), on the same routing
    # and predictions. Deep guesses take only free or stale slots of layers that run after their own, so
    # they never displace an expert some layer used on its latest pass; a stale expert they replace can
    # still be routed to again, so a single run may load an expert or two more on demand (in a sweep of
    # 456 such runs, 8 did), but summed over the sweep depth > 1 must load fewer.
    rng = random.Random(0)
    steps, misses, used_two_ahead = 8, {"one": 0, "deep": 0}, 0
    for width in (2, 3, 4):
        routing = [[sorted(rng.sample(range(EXPERTS), width)) for _ in range(LAYERS)] for _ in range(steps)]
        predictions = [
            [
                {
                    ahead: routing[step][layer + ahead]
                    if layer + ahead < LAYERS and rng.random() < 0.8 - 0.15 * ahead
                    else sorted(rng.sample(range(EXPERTS), width))
                    for ahead in range(1, LAYERS)
                }
                for layer in range(LAYERS)
            ]
            for step in range(steps)
        ]
        for slots in range(width, LAYERS * EXPERTS, 2):
            depth = automatic_prediction_depth(slots, LAYERS, EXPERTS, width)
            if depth < 2:
                continue
            for guesses_evict in (False, True):
                misses["one"] += _demand_loads(store, slots, 1, guesses_evict, routing, predictions).misses
                deep = _demand_loads(store, slots, depth, guesses_evict, routing, predictions)
                misses["deep"] += deep.misses
                used_two_ahead += deep.prefetches_used_at.get(2, 0)
    assert used_two_ahead > 0
    assert misses["deep"] < misses["one"], misses
