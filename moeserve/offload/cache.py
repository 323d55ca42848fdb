"""The expert cache: a pool of decoded-expert slots allocated once, and who occupies each slot.

Memory: one tensor [num_slots, slot_numel] on the compute device, sized so that num_slots * slot bytes <=
the byte budget; every slot, and each matrix in it, starts 64-byte aligned (alignment.py), like the
resident experts it stands in for. Its dtype is the compute dtype, or a narrower one that holds every
decoded value exactly (`slot_dtype`: bfloat16 slots for bfloat16-stored experts computed in float32 on
the CPU kernel, which widens them exactly), so the same bytes cache more experts and compute the same
bits. Nothing else ever holds decoded experts. The host's compressed copy is immutable, so evicting a
slot only forgets it (no write-back).

Eviction is pluggable (LFU with aging by default, LRU); a slot that is pinned (in use by the current layer)
or still being filled is never chosen. A caller that knows more (the provider knows the cycle of MoE
layers) names entries to evict first and the order in which layers give up slots after them; the
policy orders the experts within each group.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Container, Iterable, Sequence

import torch

from moeserve.huge_pages import weight_buffer
from moeserve.codecs import Blob
from moeserve.codecs.registry import get as codec
from moeserve.experts import ExpertWeights, expert_row_numel, expert_rows
from moeserve.layers import cpu_gemm
from moeserve.layers.grouped_gemm import runs_cpu_kernel

ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass
class SlotEntry:
    key: ExpertKey
    slot: int
    ready: Future | None  # set while the slot is being filled; done() once the weights are in
    prefetched: bool  # loaded on a prediction, not yet consumed
    pins: int = 0
    pass_used: int = 0  # the pass of its layer (a count of that layer's fetches) that last used or wants it
    distance: int = 0  # a guess's: MoE layers from the fetch that issued it forward to its own layer


class LruEviction:
    """Least recently used: a slot's claim and every use of its expert count as recent."""

    def __init__(self):
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()
        self._by_layer: dict[int, OrderedDict[ExpertKey, None]] = {}

    def touch(self, key: ExpertKey) -> None:
        """A use of the expert (a fetch or hold that asked for it)."""
        for order in (self._order, self._by_layer.setdefault(key[0], OrderedDict())):
            order[key] = None
            order.move_to_end(key)

    admit = touch  # the expert's claim of a slot (for a miss or a guess)

    def begin_pass(self, layer: int, number: int) -> None:
        """MoE layer `layer` starts its pass `number` (1, 2, ...)."""

    def forget(self, key: ExpertKey) -> None:
        self._order.pop(key, None)
        self._by_layer.get(key[0], {}).pop(key, None)

    def best_victim(self, takeable: Callable[[ExpertKey], bool], layer: int | None = None) -> ExpertKey | None:
        """The first key (of all, or of one layer's) in eviction order that is `takeable`; None if none is."""
        return next((key for key in (self._order if layer is None else self._by_layer.get(layer, ())) if takeable(key)),
                    None)


class LfuEviction:
    """Least frequently used, with aging; ties go to the least recently used (used or claimed).

    Each use adds `USE` to the expert's count, and every `AGING_PASSES` passes of its layer halve the counts of
    that layer's experts, so a count weighs recent passes most (a use's weight halves every 4 passes). Counts
    persist across evictions: a popular expert that was pushed out wins its slot back quickly. A claim alone (a
    miss before its use, a guess) counts as recent but adds nothing.

    Why aging (docs/offload.md, Eviction): the embedded model at a 25% cache, six greedy generations of 65
    tokens in one process, missed 1513 times under LRU and 1276 times under this order; counts that never age
    did worse than LRU (1645, replaying the same routing through these rules)."""

    USE = 256  # a use's weight: 8 bits of fraction survive the halvings
    AGING_PASSES = 4

    def __init__(self):
        self._uses: dict[int, dict[ExpertKey, int]] = {}  # layer -> key -> count, for every key ever seen
        self._rank: dict[ExpertKey, tuple[int, int]] = {}  # cached keys: (count, recency)
        # cached keys as (count, recency, key), best victim first: kept sorted as counts change, so a victim
        # search stops at the first takeable key (a sort per claim cost ~0.16 ms at 768 slots)
        self._order: list[tuple[int, int, ExpertKey]] = []
        self._clock = itertools.count()

    def touch(self, key: ExpertKey) -> None:
        uses = self._uses.setdefault(key[0], {})
        uses[key] = uses.get(key, 0) + self.USE
        self.admit(key)

    def admit(self, key: ExpertKey) -> None:
        self._unlist(key)
        rank = self._rank[key] = (self._uses.setdefault(key[0], {}).setdefault(key, 0), next(self._clock))
        bisect.insort(self._order, (*rank, key))

    def begin_pass(self, layer: int, number: int) -> None:
        if number % self.AGING_PASSES:
            return
        uses = self._uses.get(layer, {})
        for key in uses:
            uses[key] >>= 1
        cached = [key for key in uses if key in self._rank]
        for key in cached:
            self._unlist(key)
            rank = self._rank[key] = (uses[key], self._rank[key][1])
            bisect.insort(self._order, (*rank, key))

    def forget(self, key: ExpertKey) -> None:
        self._unlist(key)
        self._rank.pop(key, None)

    def _unlist(self, key: ExpertKey) -> None:
        rank = self._rank.get(key)
        if rank is not None:
            del self._order[bisect.bisect_left(self._order, (*rank, key))]

    def best_victim(self, takeable: Callable[[ExpertKey], bool], layer: int | None = None) -> ExpertKey | None:
        return next((key for _, _, key in self._order if (layer is None or key[0] == layer) and takeable(key)), None)


EVICTION_POLICIES = {"lru": LruEviction, "lfu": LfuEviction}


def slot_dtype(blobs: Iterable[Blob], dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype slots hold experts in: bfloat16 where every blob is bfloat16 and decodes to values bfloat16
    holds exactly (`Codec.decodes_in_stored_dtype`), the model computes in float32, and the CPU kernel, which
    takes bfloat16 weights under float32 activations and widens them exactly, computes them (so a bfloat16
    slot gives the bits a float32 one gives, in half the bytes); `dtype` otherwise."""
    narrow = (
        runs_cpu_kernel(device, dtype)
        and cpu_gemm.weight_dtype_fits(dtype, torch.bfloat16)
        and all(blob.dtype == torch.bfloat16 and codec(blob.codec).decodes_in_stored_dtype for blob in blobs)
    )
    return torch.bfloat16 if narrow else dtype


class SlotPool:
    """The decoded-expert memory: every slot holds one expert's gate, up and down matrices."""

    def __init__(self, num_slots: int, hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device,
                 storage_dtype: torch.dtype | None = None):
        """`dtype`: the model's compute dtype; `storage_dtype`: the slots' (`slot_dtype`), `dtype` when None."""
        self.hidden, self.intermediate = hidden, intermediate
        self.dtype = dtype
        storage_dtype = dtype if storage_dtype is None else storage_dtype
        # [S, expert_row_numel]: per slot gate | up | down (experts.expert_rows, the layout of stacked
        # resident experts), each matrix contiguous so it decodes straight into place.
        self.memory = weight_buffer(
            (num_slots, expert_row_numel(intermediate, hidden, storage_dtype)), storage_dtype, device
        )
        self.num_slots = num_slots
        # The views are made once: building them per use costs more than a small expert's matmuls. Gate and
        # up are fused, as in the resident model's stacked layers, so an expert is computed exactly as there.
        gate_up, down = expert_rows(self.memory, intermediate, hidden)  # [S, 2I, D], [S, D, I]
        self._views = [ExpertWeights.fused(gate_up[slot], down[slot]) for slot in range(num_slots)]

    @staticmethod
    def slot_nbytes(hidden: int, intermediate: int, dtype: torch.dtype) -> int:
        return expert_row_numel(intermediate, hidden, dtype) * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.memory.numel() * self.memory.element_size()

    def weights(self, slot: int) -> ExpertWeights:
        """The slot's gate, up and down, gate and up also as one [2I, D] matrix (one matmul)."""
        return self._views[slot]


class ExpertCache:
    """Which expert occupies which slot. Used from the model's thread only."""

    def __init__(self, num_slots: int, eviction: str = "lfu"):
        self.entries: dict[ExpertKey, SlotEntry] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self.eviction_name = eviction
        self._eviction = EVICTION_POLICIES[eviction]()

    def get(self, key: ExpertKey) -> SlotEntry | None:
        return self.entries.get(key)

    def touch(self, key: ExpertKey) -> None:
        """A use of the expert."""
        self._eviction.touch(key)

    def begin_pass(self, layer: int, number: int) -> None:
        """MoE layer `layer` starts its pass `number` (its fetches and holds, counted from 1)."""
        self._eviction.begin_pass(layer, number)

    def claim(
        self,
        key: ExpertKey,
        prefetched: bool,
        layer_order: Sequence[int] | None = None,
        keep: Container[ExpertKey] = (),
        stale: Callable[[SlotEntry], bool] | None = None,
        evicted: Callable[[SlotEntry], None] | None = None,
    ) -> SlotEntry | None:
        """A slot for `key`: a free one, else the policy's best evictable entry outside `keep` among the
        `stale` ones, else searching the layers in `layer_order` one after another (None: all layers at
        once; empty: none); None if there is none. `evicted` hears of the entry a slot is taken from."""
        if self._free:
            slot = self._free.pop()
        else:
            def takeable(k: ExpertKey) -> bool:
                return k not in keep and self._evictable(self.entries[k])

            victim = None
            if stale is not None:
                victim = self._eviction.best_victim(lambda k: takeable(k) and stale(self.entries[k]))
            for layer in [None] if layer_order is None else layer_order:
                if victim is not None:
                    break
                victim = self._eviction.best_victim(takeable, layer)
            if victim is None:
                return None
            gone = self.entries.pop(victim)
            slot = gone.slot
            self._eviction.forget(victim)
            if evicted is not None:
                evicted(gone)
        entry = SlotEntry(key=key, slot=slot, ready=None, prefetched=prefetched)
        self.entries[key] = entry
        self._eviction.admit(key)
        return entry

    @staticmethod
    def _evictable(entry: SlotEntry) -> bool:
        return entry.pins == 0 and (entry.ready is None or entry.ready.done())

    def __len__(self) -> int:
        return len(self.entries)
