"""`OffloadedExpertProvider`: the expert provider backed by the compressed store and the cache.

In:  fetch(layer, experts) from a MoE block; prefetch(layer, predicted) from the model, for each of
     the next `prediction_depth` MoE layers.
     hold(layer, experts) from a compiled CPU step (layers/moe.py expert_slots), begin_step(tokens) at its start and
     release() at its end.
Out: decoded experts from cache slots, one at a time: hits first, then misses (hold: their slots, all
     pinned until release, for the step to compute from the pool in place). Every miss starts
     loading at once (as far as free slots allow), ahead of any prefetch, so demand loads never
     queue behind guesses and decoding the next overlaps computing the current.

Prefetch hints (one per predicted layer; a newer one for a layer replaces the older) are held until
the next fetch has pinned that layer's resident experts and started its own misses, so a guess can
never evict what the current layer is about to use. They are then issued nearest layer first. Slots
are taken from the layers whose turn comes last in the cycle of MoE layers (the eviction policy picks
within a layer), so neither a miss nor a guess evicts what the next layers are about to reuse. A guess
never evicts another pending guess; a guess more than one layer ahead takes only a free or stale slot
on every device, so the deeper guesses live in the spare the depth rule (lookahead.py) counts on.

Where the configuration allows (native_slots.py: a CPU pool of szp experts, LRU, guesses at most one MoE layer
ahead, the CPU's default), the same policy runs in C++ (`SlotCache`), which then holds the cache's state:
`prefetch`, `fetch`, `hold` and `release` go there, and a compiled step reaches it from its own C++ op.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterator, Sequence

import torch

from moeserve.codecs import CodecError
from moeserve.codecs.szp_cpu import cpu_module
from moeserve.experts import ExpertWeights, StackedExperts
from moeserve.offload.cache import ExpertCache, ExpertKey, SlotEntry, SlotPool
from moeserve.offload.lookahead import automatic_prediction_depth
from moeserve.offload.native_slots import native_slot_cache
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
        top_k: int,
        prefetch: bool = True,
        prefetch_depth: int | None = None,
        native: bool = True,
    ):
        """`native`: the C++ cache where the configuration allows (native_slots.py); False keeps it in Python."""
        self.store, self.pool, self.cache, self.filler, self.stats = store, pool, cache, filler, stats
        self._prefetch, self._forced_depth = prefetch, prefetch_depth  # None: automatic_prediction_depth
        # Per MoE layer, its latest prediction not yet fully issued, and the prediction's distance (MoE
        # layers from the first fetch after it to the predicted layer; None until that fetch).
        self._hints: dict[int, tuple[Sequence[int], int | None]] = {}
        # Per MoE layer, the guesses issued for its next pass that are still loaded and not yet consumed.
        self._pending: dict[int, set[ExpertKey]] = {}
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
        self._cycle_index = {layer: i for i, layer in enumerate(cycle)}
        self._current = cycle[0]  # the MoE layer fetched last
        self._experts_per_layer = len(store.experts) // len(cycle)
        self._width = top_k  # experts the latest fetch asked for (its routing width), at least top_k
        self._top_k = top_k
        self._held: list[SlotEntry] = []  # pinned by the latest hold
        # hold's stack: the pool as stacked experts (slot s in row s), on a CPU (a GPU step routes on the device)
        self._stack = (
            StackedExperts.over(pool.memory, pool.intermediate, pool.hidden, torch.empty(0, dtype=torch.long))
            if pool.memory.device.type == "cpu" else None
        )
        self._native = None
        workers = getattr(filler, "workers", 0)  # CPU decode workers (a GPU filler has none)
        if native:
            forced_depth = prefetch_depth if prefetch else 0
            self._native = native_slot_cache(store, pool, cache, forced_depth, workers)

    @property
    def slots_in_cpp(self) -> bool:
        """Whether the cache's state is in C++ (native_slots.py), where a compiled step's op can reach it."""
        return self._native is not None

    def cached_experts(self) -> dict[ExpertKey, int]:
        """(layer, expert) → slot of every cached expert."""
        if self._native is not None:
            return {(layer, expert): slot for layer, expert, slot in self._native.entries()}
        return {key: entry.slot for key, entry in self.cache.entries.items()}

    def pinned_slots(self) -> int:
        """How many slots are pinned now (0 between steps)."""
        if self._native is not None:
            return self._native.pinned()
        return sum(entry.pins > 0 for entry in self.cache.entries.values())

    @property
    def prediction_depth(self) -> int:
        """How many MoE layers ahead the model should predict: 0 without prefetch or once every expert is
        cached (for the C++ cache: once every expert fits); the forced depth where one is given; 0 where guesses
        cost compute (the CPU); else the rule of `automatic_prediction_depth`.

        On a GPU a guess waits for an idle link and decodes on its own stream, so a wrong one costs little.
        On a CPU a guess's decode takes a core and memory bandwidth from compute, and a right one saves only the
        decode a miss would have run, which the waiting thread shares with the decode helpers. Measured with
        compiled steps (szp rel 1e-3, batch 1, a 25% cache, one compute thread, `moeserve`'s 2-core test machine,
        interleaved runs): with the C++ cache decoding next-layer guesses on the spare core while the step computes,
        the default model's misses fell from 8.9 to 3.8 a token and its decode wait from 199 to 104 us (78% of
        guesses used), yet it ran at 0.83x of resident against 0.81x without guesses (11 rounds; 0.82x against
        0.80x in 15 others, 0.74x against 0.81x in 11 more): the step's compute ran slower by about what the wait
        saved while the spare core decoded beside it. Since its slots hold bfloat16 (cache.slot_dtype: 32 of 64
        experts at 25%), misses fell from 4.2 to 1.7 a token with guesses, and it ran at 0.91x of resident against
        0.96x without (9 rounds). The qwen3_moe of hidden 1024, 32 experts of 512 (bf16) ran at 0.95x of its speed
        without guesses. The Python provider's own bookkeeping made guesses cost more still (default
        model, 25%: 423 against 376 tok/s). `prefetch_depth` still forces guesses; the C++ cache takes depth 1.
        Eager steps had favoured depth 1 over the rule's depth 7 (174 against 205 tok/s, default model, 50%),
        when a step's own overhead hid the bookkeeping."""
        if self._native is not None:
            if not self._prefetch or self.pool.num_slots >= len(self.store.experts):
                return 0
            return self._forced_depth or 0
        if not self._prefetch or len(self.cache) >= len(self.store.experts):
            return 0
        if self._forced_depth is not None:
            return self._forced_depth
        if self.filler.guesses_cost_compute:
            return 0
        return automatic_prediction_depth(
            self.pool.num_slots, len(self._passes), self._experts_per_layer, self._width
        )

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        if self._native is not None:
            self._native.guess(layer, list(experts))
            return
        self._hints[layer] = (experts, None)  # replaces an older prediction for the layer

    def stacked(self, layer: int) -> None:
        """Never: which experts a layer needs must reach the host, to be loaded."""
        return None

    def fetch(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        if self._native is not None:
            slots = self._native_hold(layer, experts)
            try:
                for expert, slot in zip(experts, slots):
                    yield expert, self.pool.weights(slot)
            finally:
                self.release()
            return
        for entry in self._serve(layer, experts, hold=False):
            yield entry.key[1], self.pool.weights(entry.slot)

    def held_stack(self, layer: int, experts: int) -> StackedExperts | None:
        """The slot pool as one stack (gate_up [S, 2I, D], down [S, D, I]) for `hold`'s slots, where a compiled
        CPU step can compute MoE layer `layer` from it: the pool is on the CPU and `experts` (the most a step may
        route to at once) can be pinned together. None otherwise: that layer goes through `fetch`."""
        fits = min(experts, self._experts_per_layer) <= self.pool.num_slots
        return self._stack if fits else None

    def hold(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Load `experts` (ascending ids) of `layer` and pin all of them until the next `hold` or `release`
        (the step computes from their slots in between); returns their slots, in the order of `experts`.
        The loads, statistics and prefetches are `fetch`'s. Only for layers `held_stack` serves."""
        if self._native is not None:
            return self._native_hold(layer, experts)
        self.release()
        slots = {}
        for entry in self._serve(layer, experts, hold=True):
            slots[entry.key[1]] = entry.slot
        return [slots[expert] for expert in experts]

    def begin_step(self, tokens: int) -> None:
        """A compiled step of `tokens` real rows starts on this thread: its C++ op reaches this provider's C++ cache."""
        if self._native is not None:
            self._native.begin_step(tokens)

    def release(self) -> None:
        """Unpin what the latest `hold` pinned (the end of a step calls this)."""
        if self._native is not None:
            self._native.release()
            self._take_native_counters()
            return
        for entry in self._held:
            entry.pins -= 1
            self.filler.release(entry.slot)
        self._held = []

    def _native_hold(self, layer: int, experts: Sequence[int]) -> list[int]:
        try:
            return self._native.hold(layer, list(experts))
        except cpu_module().FormatError as error:  # a malformed payload: the message names the layer and the expert
            raise CodecError(str(error)) from None

    def _take_native_counters(self) -> None:
        counts = self._native.take_counters()
        stats = self.stats
        stats.hits += counts["hits"]
        stats.misses += counts["misses"]
        stats.miss_bytes += counts["miss_bytes"]
        stats.bytes_transferred += counts["miss_bytes"] + counts["prefetch_bytes"]
        for name in ("prefetches_issued", "prefetches_used", "prefetch_bytes", "prefetch_used_bytes",
                     "prefetch_bytes_wasted"):
            setattr(stats, name, getattr(stats, name) + counts[name])
        for name in ("prefetches_issued_at", "prefetches_used_at"):
            by_distance = getattr(stats, name)
            for distance, count in counts[name].items():
                by_distance[distance] = by_distance.get(distance, 0) + count
        stats.wait_seconds += counts["wait_seconds"]
        stats.add_decode_time(counts["decode_seconds"])

    def _serve(self, layer: int, experts: Sequence[int], hold: bool) -> Iterator[SlotEntry]:
        """Each expert's entry once it is loaded: hits first, then misses as they land. Without `hold` an
        entry is unpinned when the consumer asks for the next (its slot may then be reused); with `hold`
        every entry stays pinned, in self._held, until `release`."""
        self._current = layer
        self._hints.pop(layer, None)  # the layer asks for its experts itself now
        self._passes[layer] += 1
        self.cache.begin_pass(layer, self._passes[layer])
        self._width = max(self._top_k, len(experts))
        # The layer's guesses it does not ask for were wrong: their slots are the first to give back.
        self._drop_guesses(layer, keep={(layer, expert) for expert in experts})
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
        self._issue_hints(missing)
        # Ready experts first: computing them hides the loads still in flight.
        resident.sort(key=lambda entry: not entry.ready.done())
        release = self._keep if hold else self._release
        try:
            for entry in resident:
                self._use(entry)
                yield entry
                release(entry, held)
                self._issue_hints(missing)
            while missing or in_flight:
                if not in_flight:
                    # Every slot was held by this layer's residents or by prefetches still filling;
                    # the residents are released now, so wait for the fills and claim again.
                    self._wait_for_fills()
                    held += self._start_misses(missing, in_flight)
                    if not in_flight:
                        raise RuntimeError("no expert cache slot can be freed; the cache holds no unpinned slot")
                entry = in_flight.popleft()
                self._use(entry)
                yield entry
                release(entry, held)
                held += self._start_misses(missing, in_flight)
                self._issue_hints(missing)
        finally:
            # A consumer that stops early (an exception in compute) must not leave slots pinned.
            for entry in held:
                entry.pins -= 1
                self.filler.release(entry.slot)

    def _release(self, entry: SlotEntry, held: list[SlotEntry]) -> None:
        entry.pins -= 1
        held.remove(entry)
        self.filler.release(entry.slot)  # compute has queued its reads of the slot

    def _keep(self, entry: SlotEntry, held: list[SlotEntry]) -> None:
        held.remove(entry)
        self._held.append(entry)  # pinned until release()

    def _use(self, entry: SlotEntry) -> None:
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
            self.stats.prefetches_used_at[entry.distance] = self.stats.prefetches_used_at.get(entry.distance, 0) + 1
            self.stats.prefetch_used_bytes += self.store.experts[entry.key].nbytes

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

    def _issue_hints(self, missing: deque[ExpertKey]) -> None:
        """Issue the held predictions, nearest MoE layer first. Called once the current fetch has started
        its misses and again after each expert it hands out: a guess held back by a busy link goes when
        the link is idle again, during this fetch or the next."""
        if missing or not self._hints:
            return  # while a miss of the current layer waits for a slot, no guess may take one first
        for target in sorted(self._hints, key=lambda layer: self._distance(self._current, layer)):
            experts, distance = self._hints[target]
            if distance is None:
                distance = self._distance(self._current, target)
                self._hints[target] = (experts, distance)
            guessed = {(target, expert) for expert in experts}
            # a newer prediction replaces the older one's guesses
            pending = self._pending[target] = self._drop_guesses(target, keep=guessed)
            for key in sorted(guessed):
                if self.cache.get(key) is not None:
                    continue
                # A guess must not delay a demand load: on a GPU it goes only onto an idle link (see _start
                # for the slots it may take).
                if not self.filler.link_idle():
                    return
                keep = guessed.union(*self._pending.values())
                if self._start(key, prefetched=True, keep=keep, distance=distance) is None:
                    self._hints.clear()  # no free or stale slot: the real routing will load what is missing
                    return
                pending.add(key)
                self.stats.prefetches_issued += 1
                self.stats.prefetches_issued_at[distance] = self.stats.prefetches_issued_at.get(distance, 0) + 1
                self.stats.prefetch_bytes += self.store.experts[key].nbytes
            del self._hints[target]

    def _drop_guesses(self, layer: int, keep: set[ExpertKey]) -> set[ExpertKey]:
        """Forget `layer`'s pending guesses outside `keep`: they turn stale, the first slots to give back.
        Returns the pending guesses in `keep`."""
        pending = self._pending.pop(layer, set())
        for key in pending - keep:
            entry = self.cache.get(key)
            if entry is not None and entry.prefetched:
                entry.pass_used = self._passes[layer] - 1
        return pending & keep

    def _distance(self, layer: int, target: int) -> int:
        """MoE layers from `layer` forward to `target` in the cycle: 1 for the next, up to a full cycle."""
        cycle = len(self._cycle_index)
        return (self._cycle_index[target] - self._cycle_index[layer] - 1) % cycle + 1

    def _start(self, key: ExpertKey, prefetched: bool, keep=(), distance: int = 0) -> SlotEntry | None:
        # A miss may take any layer's slot, in give-up order. The next layer's guess too where the filler
        # says guesses may evict (CPU: demand decodes jump the queue; on the prefetch test's qwen3_moe
        # checkpoint, sz3 at a 50% cache, this cut misses from 27 to 19 in 24 tokens). On a GPU a wrong
        # guess that evicts an expert another layer reuses costs a demand load over the link, so there a
        # guess takes only a free or stale slot; so does a deeper guess everywhere: its slot is held
        # while the nearer layers' demand loads run, and the depth rule gives it only the spare.
        may_evict = not prefetched or (self.filler.guesses_evict and distance == 1)
        layer_order = self._give_up_order[key[0]] if may_evict else ()
        stale = self._is_stale
        if distance > 1:
            # Nor does it take a stale slot of a layer that runs before its own: that layer may reuse it.
            sooner = {self._give_up_order[key[0]][back] for back in range(1, distance)}
            stale = lambda entry: entry.key[0] not in sooner and self._is_stale(entry)  # noqa: E731
        entry = self.cache.claim(key, prefetched, layer_order, keep, stale, self._evicted)
        if entry is not None:
            # a guess is for its layer's next pass; a miss is for the pass running now
            entry.pass_used = self._passes[key[0]] + (1 if prefetched else 0)
            entry.distance = distance
            packed = self.store.experts[key]
            entry.ready = self.filler.start(packed, entry.slot, urgent=not prefetched)
            if not prefetched:
                self.stats.miss_bytes += packed.nbytes
        return entry

    def _evicted(self, entry: SlotEntry) -> None:
        self._pending.get(entry.key[0], set()).discard(entry.key)
        if entry.prefetched:  # a guess no fetch consumed
            self.stats.prefetch_bytes_wasted += self.store.experts[entry.key].nbytes

    def _is_stale(self, entry: SlotEntry) -> bool:
        return entry.pass_used < self._passes[entry.key[0]]

    def close(self) -> None:
        self.filler.close()
