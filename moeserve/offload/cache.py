"""The expert cache: a pool of decoded-expert slots allocated once, and who occupies each slot.

Memory: one tensor [num_slots, slot_numel] on the compute device, sized so that num_slots * slot bytes <=
the byte budget; every slot, and each matrix in it, starts 64-byte aligned (alignment.py), like the
resident experts it stands in for. Its dtype is the compute dtype, or a narrower one that holds every
decoded value exactly (`slot_dtype`: bfloat16 slots for bfloat16-stored experts computed in float32 on
the CPU kernel, which widens them exactly), so the same bytes cache more experts and compute the same
bits. Nothing else ever holds decoded experts. The host's compressed copy is immutable, so evicting a
slot only forgets it (no write-back).

Eviction is pluggable (LRU by default, LFU); a slot that is pinned (in use by the current layer)
or still being filled is never chosen. A caller that knows more (the provider knows the cycle of MoE
layers) names entries to evict first and the order in which layers give up slots after them; the
policy orders the experts within each group.
"""

from __future__ import annotations

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
    def __init__(self):
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()
        self._by_layer: dict[int, OrderedDict[ExpertKey, None]] = {}

    def touch(self, key: ExpertKey) -> None:
        for order in (self._order, self._by_layer.setdefault(key[0], OrderedDict())):
            order[key] = None
            order.move_to_end(key)

    def forget(self, key: ExpertKey) -> None:
        self._order.pop(key, None)
        self._by_layer.get(key[0], {}).pop(key, None)

    def victims(self, layer: int | None = None) -> list[ExpertKey]:
        """Keys (all, or one layer's) in eviction order, best victim first."""
        return list(self._order if layer is None else self._by_layer.get(layer, ()))


class LfuEviction:
    """Least frequently used; ties go to the least recently used. Counts persist across evictions
    so a popular expert that was pushed out wins its slot back quickly."""

    def __init__(self):
        self._uses: dict[ExpertKey, int] = {}
        self._recency: dict[ExpertKey, int] = {}
        self._clock = itertools.count()
        self._resident: dict[int, set[ExpertKey]] = {}

    def touch(self, key: ExpertKey) -> None:
        self._uses[key] = self._uses.get(key, 0) + 1
        self._recency[key] = next(self._clock)
        self._resident.setdefault(key[0], set()).add(key)

    def forget(self, key: ExpertKey) -> None:
        self._resident.get(key[0], set()).discard(key)

    def victims(self, layer: int | None = None) -> list[ExpertKey]:
        groups = self._resident.values() if layer is None else [self._resident.get(layer, ())]
        keys = itertools.chain.from_iterable(groups)
        return sorted(keys, key=lambda k: (self._uses[k], self._recency[k]))


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

    def __init__(self, num_slots: int, eviction: str = "lru"):
        self.entries: dict[ExpertKey, SlotEntry] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self.eviction_name = eviction
        self._eviction = EVICTION_POLICIES[eviction]()

    def get(self, key: ExpertKey) -> SlotEntry | None:
        return self.entries.get(key)

    def touch(self, key: ExpertKey) -> None:
        self._eviction.touch(key)

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
            groups = [self._eviction.victims()] if layer_order is None else map(self._eviction.victims, layer_order)
            if stale is not None:
                # lazily: the oldest entries are usually stale, so the scan stops early
                groups = itertools.chain([(k for k in self._eviction.victims() if stale(self.entries[k]))], groups)
            victim = next(
                (k for group in groups for k in group if k not in keep and self._evictable(self.entries[k])), None
            )
            if victim is None:
                return None
            gone = self.entries.pop(victim)
            slot = gone.slot
            self._eviction.forget(victim)
            if evicted is not None:
                evicted(gone)
        entry = SlotEntry(key=key, slot=slot, ready=None, prefetched=prefetched)
        self.entries[key] = entry
        self._eviction.touch(key)
        return entry

    @staticmethod
    def _evictable(entry: SlotEntry) -> bool:
        return entry.pins == 0 and (entry.ready is None or entry.ready.done())

    def __len__(self) -> int:
        return len(self.entries)
