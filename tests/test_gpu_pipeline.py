"""The GPU fill pipeline's ordering, on fake streams: no race, no host wait, the right bytes in every slot.

The pipeline (moeserve/offload/gpu_filler.py) runs here on CPU tensors with tests/fake_streams.py in
place of CUDA streams; the fake records what each stream ordered and reports every pair of accesses
to the same bytes that the device could run in either order.
"""

from __future__ import annotations

import random

import pytest
import torch
from fake_streams import FakeStreams
from random_store import random_store

from moeserve.codecs import decode
from moeserve.offload.cache import ExpertCache, SlotPool
from moeserve.offload.gpu_filler import GpuSlotFiller, StagingRing
from moeserve.offload.provider import OffloadedExpertProvider
from moeserve.offload.stats import OffloadStats
from moeserve.offload.store import CompressedStore

D, I, LAYERS, EXPERTS, TOP_K = 16, 8, 3, 6, 2


@pytest.fixture(scope="module")
def store() -> CompressedStore:
    return random_store(LAYERS, EXPERTS, D, I, {"default": {"codec": "szp", "mode": "abs", "error_bound": 1e-2}, "rules": [{"layers": "0", "codec": "raw"}]})


def _pipeline(store, slots: int, prefetch: bool = True, depth: int | None = None, streams=None):
    streams = FakeStreams() if streams is None else streams
    stats = OffloadStats()
    pool = SlotPool(slots, D, I, torch.float32, torch.device("cpu"))
    max_packed = max(p.nbytes for p in store.experts.values())
    filler = GpuSlotFiller(pool, stats, max_packed, streams, staging_experts=2, timeline=True)
    provider = OffloadedExpertProvider(
        store, pool, ExpertCache(slots), filler, stats, TOP_K, prefetch=prefetch, prefetch_depth=depth
    )
    return streams, provider


def _reference(store, layer: int, expert: int) -> list[torch.Tensor]:
    return [decode(blob) for blob in store.experts[(layer, expert)].blobs]


def _run_steps(
    streams: FakeStreams, provider, store, steps: int, batch_experts: int, seed: int = 0, after_compute=None
) -> None:
    """A model's decode loop: each step fetches every layer's routed experts, computes with each (a read
    of its slot on the compute stream) and guesses the experts of the next `prediction_depth` layers.
    `after_compute()`, if given, runs after each expert's compute (e.g. to let a lagging device catch up)."""
    rng = random.Random(seed)
    routing = [[sorted(rng.sample(range(EXPERTS), batch_experts)) for _ in range(LAYERS)] for _ in range(steps)]
    for step, layers in enumerate(routing):
        for layer, experts in enumerate(layers):
            for upcoming in range(layer + 1, min(LAYERS, layer + 1 + provider.prediction_depth)):
                right = rng.random() < 0.5
                provider.prefetch(upcoming, layers[upcoming] if right else sorted(rng.sample(range(EXPERTS), batch_experts)))
            seen = []
            for expert, weights in provider.fetch(layer, experts):
                tensors = [weights.gate, weights.up, weights.down]
                streams.compute_reads(tensors)
                for got, want in zip(tensors, _reference(store, layer, expert)):
                    assert torch.equal(got, want), (step, layer, expert)
                seen.append(expert)
                if after_compute is not None:
                    after_compute()
            assert sorted(seen) == experts


@pytest.mark.parametrize("slots,batch_experts", [(TOP_K, TOP_K), (TOP_K + 1, TOP_K), (5, 4), (9, 3), (LAYERS * EXPERTS, 4)])
def test_no_race_no_host_wait_and_the_right_weights(store, slots, batch_experts):
    streams, provider = _pipeline(store, slots)
    _run_steps(streams, provider, store, steps=6, batch_experts=batch_experts)
    assert streams.races == []
    assert streams.host_waits == 0
    assert streams.copies == provider.stats.misses + provider.stats.prefetches_issued


def test_the_checker_sees_a_fill_that_does_not_wait_for_compute(store):
    # Without the slot-read events a refill could overwrite weights compute has yet to read.
    streams, provider = _pipeline(store, TOP_K)
    provider.filler.release = lambda slot: None
    _run_steps(streams, provider, store, steps=3, batch_experts=TOP_K)
    assert any("decode writes a slot" in race and "compute reads a slot" in race for race in streams.races)


def test_the_checker_sees_a_copy_over_staging_still_being_decoded(store, monkeypatch):
    streams, provider = _pipeline(store, 5)
    ring = provider.filler._ring
    reserve = ring.reserve
    monkeypatch.setattr(ring, "reserve", lambda nbytes, released: (reserve(nbytes, released)[0], None))
    _run_steps(streams, provider, store, steps=3, batch_experts=4)
    assert any("copy into staging" in race for race in streams.races)


def test_guesses_wait_for_an_idle_link_and_take_only_free_or_stale_slots(store):
    streams, provider = _pipeline(store, 4)
    busy = [True]
    provider.filler.link_idle = lambda: not busy[0]
    provider.prefetch(1, [0, 1])
    list(provider.fetch(0, [0, 1]))  # the hint is issued after this fetch's misses: link busy, so dropped
    assert provider.stats.prefetches_issued == 0
    busy[0] = False
    provider.prefetch(1, [2, 3])
    list(provider.fetch(0, [0, 1]))  # two free slots left: both guesses go
    assert provider.stats.prefetches_issued == 2
    # Full cache, nothing stale: layer 0's experts were used on its latest pass, layer 1's are guesses
    # for its next. A further guess takes no slot.
    provider.prefetch(2, [4, 5])
    list(provider.fetch(0, [0, 1]))
    assert provider.stats.prefetches_issued == 2
    assert {key for key in provider.cache.entries} == {(0, 0), (0, 1), (1, 2), (1, 3)}


def _guesses_on_a_busy_link(store, link_idle=None) -> tuple[int, int, int]:
    """Two layers of guesses ahead on a device that runs behind the host and catches up after about a
    third of the experts computed. Returns the guesses started, how many of them started while a copy was still in
    flight, and how many were for the layer after next."""
    streams = FakeStreams(lagging=True)
    _, provider = _pipeline(store, 12, depth=2, streams=streams)
    filler = provider.filler
    if link_idle is not None:
        filler.link_idle = link_idle
    started = {"guesses": 0, "on_busy_link": 0}
    start = filler.start

    def watched_start(packed, slot, urgent):
        if not urgent:
            started["guesses"] += 1
            started["on_busy_link"] += not streams.idle(filler.copy_stream)
        return start(packed, slot, urgent)

    filler.start = watched_start
    catch_up = random.Random(1)

    def device_may_catch_up():
        if catch_up.random() < 0.3:
            streams.finish()

    _run_steps(streams, provider, store, steps=8, batch_experts=TOP_K, after_compute=device_may_catch_up)
    assert streams.races == []
    return started["guesses"], started["on_busy_link"], provider.stats.prefetches_issued_at.get(2, 0)


def test_no_guess_starts_while_the_link_is_busy(store):
    guesses, on_busy_link, two_ahead = _guesses_on_a_busy_link(store)
    assert guesses > 0 and two_ahead > 0
    assert on_busy_link == 0


def test_the_checker_sees_a_guess_on_a_busy_link(store):
    # A provider that ignored the link's state would start guesses behind demand copies.
    _, on_busy_link, _ = _guesses_on_a_busy_link(store, link_idle=lambda: True)
    assert on_busy_link > 0


def test_wasted_guesses_are_counted(store):
    streams, provider = _pipeline(store, 4)
    provider.prefetch(1, [4, 5])
    list(provider.fetch(0, [0, 1]))
    list(provider.fetch(1, [0, 1]))  # the guesses were wrong, and layer 1's misses evict them
    wasted = store.experts[(1, 4)].nbytes + store.experts[(1, 5)].nbytes
    assert provider.stats.prefetch_bytes == wasted
    assert provider.stats.prefetch_bytes_wasted == wasted
    assert provider.stats.prefetch_precision == 0.0


def test_timeline_counts_copy_decode_and_wait(store):
    streams, provider = _pipeline(store, 5)
    _run_steps(streams, provider, store, steps=2, batch_experts=4)
    provider.filler.collect_timing()
    stats = provider.stats
    assert stats.copy_seconds > 0 and stats.decode_seconds > 0 and stats.compute_wait_seconds >= 0


def test_staging_ring_waits_only_for_the_newest_overlapping_reader():
    ring = StagingRing(100)
    assert ring.reserve(40, "a") == (0, None)
    assert ring.reserve(40, "b") == (40, None)
    assert ring.reserve(40, "c") == (0, "a")  # wraps: overlaps a only
    assert ring.reserve(30, "d") == (40, "b")
    assert ring.reserve(50, "e") == (0, "d")  # does not fit after d: wraps over c and d; d finished last
    with pytest.raises(ValueError, match="does not fit"):
        ring.reserve(101, "f")


def test_unpinned_arena_holds_exactly_its_experts(store):
    sizes = {}
    for packed in store.experts.values():
        sizes[id(packed.arena)] = packed.arena.nbytes
    assert len(sizes) == LAYERS  # one arena per MoE layer
    assert store.nbytes == sum(sizes.values())
    assert store.nbytes < sum(p.nbytes for p in store.experts.values()) + 8 * 3 * len(store.experts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_arena_is_page_locked_and_exact_size():
    from moeserve.offload.host_memory import HostArena

    nbytes = 3 * 2**20 + 5  # torch's pinned allocator would hold 4 MiB
    arena = HostArena(nbytes, pin=True)
    assert arena.nbytes == nbytes and arena.data.is_pinned()
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    arena.data.fill_(7)
    device.copy_(arena.data, non_blocking=True)
    torch.cuda.synchronize()
    assert bool((device == 7).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("budget,depth", [("10%", None), ("25%", None), ("50%", None), ("50%", 3)])
def test_offloaded_generation_on_cuda_equals_resident(checkpoint_factory, budget, depth):
    from moeserve import LLM, SamplingParams

    directory, _ = checkpoint_factory("qwen3_moe", num_hidden_layers=4, num_experts=8, seed=3)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(30, 50))]
    resident = [o.token_ids for o in LLM(directory, device="cuda").generate(prompts, params)]
    raw = LLM(directory, device="cuda", policy={"default": {"codec": "raw"}}, expert_cache=budget,
              prefetch_depth=depth, progress=False)
    assert [o.token_ids for o in raw.generate(prompts, params)] == resident
