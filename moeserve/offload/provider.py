"""`OffloadedExpertProvider`: the expert provider backed by the compressed store and the cache.

In:  fetch(layer, experts) from a MoE block; prefetch(layer, predicted) from the model.
Out: decoded experts from cache slots, one at a time: hits first, then misses. Every miss starts
     loading at once (as far as free slots allow), ahead of any prefetch, so demand loads never
     queue behind guesses and decoding the next overlaps computing the current.

Prefetch hints are held until the next fetch has pinned that layer's resident experts and started
its own misses, so a guess about layer l+1 can never evict what layer l is about to use. Slots are
taken from the layers whose turn comes last in the cycle of MoE layers (the eviction policy picks
within a layer), so neither a miss nor a guess evicts what the next layers are about to reuse.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterator, Sequence

import torch

from moeserve.experts import ExpertWeights, keeps_gate_up_apart
from moeserve.offload.cache import ExpertCache, ExpertKey, SlotEntry, SlotPool
from moeserve.offload.stats import OffloadStats
from moeserve.offload.store import CompressedStore


class OffloadedExpertProvider:
    def __init__(
        self,
        store: CompressedStore,
        pool: SlotPool,
        cache: ExpertCache,
        filler,
        stats: OffloadStats,
        prefetch: bool = True,
    ):
        self.store, self.pool, self.cache, self.filler, self.stats = store, pool, cache, filler, stats
        # Per expert, the layout of gate and up the resident model would load it in (see keeps_gate_up_apart).
        memory = pool.memory
        self._gate_up_apart = {
            key: keeps_gate_up_apart(
                packed.gate_up_apart, [(torch.device("cpu"), b.dtype) for b in packed.blobs], memory.device, memory.dtype
            )
            for key, packed in store.experts.items()
        }
        self._prefetch = prefetch
        self._hint: tuple[int, Sequence[int]] | None = None
        # Where a slot comes from: first an expert that its layer did not use on its latest pass (the
        # eviction policy's order across layers); with room for more than one step's experts, those are
        # the least likely to be reused. Then layer l's own experts unused this step (not needed before
        # the next step), then the layers that ran most recently: each step runs the MoE layers in one
        # cycle, so those run again last. Plain LRU would take the layer after l, the one needed next,
        # and every eviction would cascade into the following layers' misses.
        cycle = sorted({layer for layer, _ in store.experts})
        self._passes = {layer: 0 for layer in cycle}  # fetches of each layer so far
        self._give_up_order = {
            layer: [cycle[(i - back) % len(cycle)] for back in range(len(cycle))] for i, layer in enumerate(cycle)
        }

    @property
    def wants_predictions(self) -> bool:
        """Whether the model should predict the next layer's experts: not once every expert is cached."""
        return self._prefetch and len(self.cache) < len(self.store.experts)

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        self._hint = (layer, experts)

    def stacked(self, layer: int) -> None:
        """Never: which experts a layer needs must reach the host, to be loaded."""
        return None

    def fetch(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        self._passes[layer] += 1
        resident: list[SlotEntry] = []
        missing: deque[ExpertKey] = deque()
        for expert in experts:
            entry = self.cache.get((layer, expert))
            if entry is None:
                missing.append((layer, expert))
            else:
                entry.pins += 1
                resident.append(entry)
        self.stats.hits += len(resident)
        self.stats.misses += len(missing)
        in_flight: deque[SlotEntry] = deque()
        held = resident + self._start_misses(missing, in_flight)  # pinned by this fetch, not yet released
        self._issue_hint()
        # Ready experts first: computing them hides the loads still in flight.
        resident.sort(key=lambda entry: not entry.ready.done())
        try:
            for entry in resident:
                yield self._use(entry)
                self._release(entry, held)
            while missing or in_flight:
                if not in_flight:
                    # Every slot was held by this layer's residents or by prefetches still filling;
                    # the residents are released now, so wait for the fills and claim again.
                    self._wait_for_fills()
                    held += self._start_misses(missing, in_flight)
                    if not in_flight:
                        raise RuntimeError("no expert cache slot can be freed; the cache holds no unpinned slot")
                entry = in_flight.popleft()
                yield self._use(entry)
                self._release(entry, held)
                held += self._start_misses(missing, in_flight)
        finally:
            # A consumer that stops early (an exception in compute) must not leave slots pinned.
            for entry in held:
                entry.pins -= 1
                self.filler.release(entry.slot)

    def _release(self, entry: SlotEntry, held: list[SlotEntry]) -> None:
        entry.pins -= 1
        held.remove(entry)
        self.filler.release(entry.slot)  # compute has queued its reads of the slot

    def _use(self, entry: SlotEntry) -> tuple[int, ExpertWeights]:
        if not entry.ready.done():
            start = time.perf_counter()
            entry.ready.wait()
            self.stats.wait_seconds += time.perf_counter() - start
        else:
            entry.ready.wait()  # orders a GPU compute stream after the fill; immediate on CPU
        self.cache.touch(entry.key)
        entry.pass_used = self._passes[entry.key[0]]
        if entry.prefetched:
            entry.prefetched = False
            self.stats.prefetches_used += 1
            self.stats.prefetch_used_bytes += self.store.experts[entry.key].nbytes
        return entry.key[1], self.pool.weights(entry.slot, self._gate_up_apart[entry.key])

    def _start_misses(self, missing: deque[ExpertKey], in_flight: deque[SlotEntry]) -> list[SlotEntry]:
        """Start loads for as many misses as slots allow; returns the new, pinned entries."""
        started = []
        while missing:
            entry = self._start(missing[0], prefetched=False)
            if entry is None:
                break
            missing.popleft()
            entry.pins += 1
            in_flight.append(entry)
            started.append(entry)
        return started

    def _wait_for_fills(self) -> None:
        for entry in list(self.cache.entries.values()):
            if not entry.ready.done():
                entry.ready.synchronize()

    def _issue_hint(self) -> None:
        if self._hint is None:
            return
        layer, experts = self._hint
        self._hint = None
        guessed = {(layer, expert) for expert in experts}
        for key in sorted(guessed):
            if self.cache.get(key) is not None:
                continue
            # A guess must not delay a demand load: on a GPU it goes only onto an idle link (see _start
            # for the slots it may take).
            if not self.filler.link_idle():
                return
            if self._start(key, prefetched=True, keep=guessed) is None:
                return  # no free or stale slot: the real routing will load what is missing
            self.stats.prefetches_issued += 1
            self.stats.prefetch_bytes += self.store.experts[key].nbytes

    def _start(self, key: ExpertKey, prefetched: bool, keep=()) -> SlotEntry | None:
        # A miss may take any layer's slot, in give-up order. A guess too where the filler says guesses
        # may evict (CPU: demand decodes jump the queue; on the prefetch test's qwen3_moe checkpoint,
        # sz3 at a 50% cache, this cut misses from 27 to 19 in 24 tokens). On a GPU a wrong guess that
        # evicts an expert another layer reuses costs a demand load over the link, so there a guess
        # takes only a free or stale slot.
        may_evict = not prefetched or self.filler.guesses_evict
        layer_order = self._give_up_order[key[0]] if may_evict else ()
        entry = self.cache.claim(key, prefetched, layer_order, keep, self._is_stale, self._evicted)
        if entry is not None:
            # a guess is for its layer's next pass; a miss is for the pass running now
            entry.pass_used = self._passes[key[0]] + (1 if prefetched else 0)
            packed = self.store.experts[key]
            entry.ready = self.filler.start(packed, entry.slot, urgent=not prefetched)
            if not prefetched:
                self.stats.miss_bytes += packed.nbytes
        return entry

    def _evicted(self, entry: SlotEntry) -> None:
        if entry.prefetched:  # a guess no fetch consumed
            self.stats.prefetch_bytes_wasted += self.store.experts[entry.key].nbytes

    def _is_stale(self, entry: SlotEntry) -> bool:
        return entry.pass_used < self._passes[entry.key[0]]

    def close(self) -> None:
        self.filler.close()
