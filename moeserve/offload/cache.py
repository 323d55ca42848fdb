"""The expert cache: a pool of decoded-expert slots allocated once, and who occupies each slot.

Memory: one tensor [num_slots, slot_numel] in the compute dtype on the compute device, sized so
that num_slots * slot bytes <= the byte budget. Nothing else ever holds decoded experts. The
host's compressed copy is immutable, so evicting a slot only forgets it (no write-back).

Eviction is pluggable (LRU by default, LFU); a slot that is pinned (in use by the current layer)
or still being filled is never chosen. A caller that knows more about when each expert is needed
next (the provider knows the layer cycle) ranks the candidates; the policy's order breaks ties.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import torch

from moeserve.experts import ExpertWeights

ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass
class SlotEntry:
    key: ExpertKey
    slot: int
    ready: Future | None  # set while the slot is being filled; done() once the weights are in
    prefetched: bool  # loaded on a prediction, not yet consumed
    pins: int = 0


class LruEviction:
    def __init__(self):
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()

    def touch(self, key: ExpertKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def forget(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def victims(self):
        """Keys in eviction order, best victim first."""
        return iter(list(self._order))


class LfuEviction:
    """Least frequently used; ties go to the least recently used. Counts persist across evictions
    so a popular expert that was pushed out wins its slot back quickly."""

    def __init__(self):
        self._uses: dict[ExpertKey, int] = {}
        self._recency: dict[ExpertKey, int] = {}
        self._clock = itertools.count()
        self._resident: set[ExpertKey] = set()

    def touch(self, key: ExpertKey) -> None:
        self._uses[key] = self._uses.get(key, 0) + 1
        self._recency[key] = next(self._clock)
        self._resident.add(key)

    def forget(self, key: ExpertKey) -> None:
        self._resident.discard(key)

    def victims(self):
        return iter(sorted(self._resident, key=lambda k: (self._uses[k], self._recency[k])))


EVICTION_POLICIES = {"lru": LruEviction, "lfu": LfuEviction}


class SlotPool:
    """The decoded-expert memory: every slot holds one expert's gate, up and down matrices."""

    def __init__(self, num_slots: int, hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device):
        self.hidden, self.intermediate = hidden, intermediate
        self.matrix_numel = hidden * intermediate
        # [S, 3 * I * D]: per slot gate | up | down, contiguous so each decodes straight into place.
        self.memory = torch.empty(num_slots, 3 * self.matrix_numel, dtype=dtype, device=device)
        self.num_slots = num_slots
        # The views are made once: building them per use costs more than a small expert's matmuls.
        self._views = [self._slot_views(slot) for slot in range(num_slots)]

    @staticmethod
    def slot_nbytes(hidden: int, intermediate: int, dtype: torch.dtype) -> int:
        return 3 * hidden * intermediate * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.memory.numel() * self.memory.element_size()

    def weights(self, slot: int) -> ExpertWeights:
        return self._views[slot]

    def _slot_views(self, slot: int) -> ExpertWeights:
        row, n, d, i = self.memory[slot], self.matrix_numel, self.hidden, self.intermediate
        return ExpertWeights.fused(gate_up=row[: 2 * n].view(2 * i, d), down=row[2 * n :].view(d, i))


class ExpertCache:
    """Which expert occupies which slot. Used from the model's thread only."""

    def __init__(self, num_slots: int, eviction: str = "lru"):
        self.entries: dict[ExpertKey, SlotEntry] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self._eviction = EVICTION_POLICIES[eviction]()

    def get(self, key: ExpertKey) -> SlotEntry | None:
        return self.entries.get(key)

    def touch(self, key: ExpertKey) -> None:
        self._eviction.touch(key)

    def claim(
        self, key: ExpertKey, prefetched: bool, rank: Callable[[ExpertKey], int] | None = None
    ) -> SlotEntry | None:
        """A slot for `key`: a free one, else the evictable entry with the highest `rank` (ties, or no rank:
        the eviction policy's order); None if every entry is pinned or still filling."""
        if self._free:
            slot = self._free.pop()
        else:
            victim, best = None, None
            for candidate in self._eviction.victims():
                if not self._evictable(self.entries[candidate]):
                    continue
                score = rank(candidate) if rank is not None else 0
                if best is None or score > best:
                    victim, best = candidate, score
                    if rank is None:
                        break
            if victim is None:
                return None
            slot = self.entries.pop(victim).slot
            self._eviction.forget(victim)
        entry = SlotEntry(key=key, slot=slot, ready=None, prefetched=prefetched)
        self.entries[key] = entry
        self._eviction.touch(key)
        return entry

    @staticmethod
    def _evictable(entry: SlotEntry) -> bool:
        return entry.pins == 0 and (entry.ready is None or entry.ready.done())

    def __len__(self) -> int:
        return len(self.entries)
