"""Baseline (b) of bench/throughput.py: naive offload, the pattern of mixtral-offloading and of accelerate.

In:  every routed expert uncompressed in its stored dtype (bf16 for the presets and most checkpoints), one
     host buffer per expert laid out like a cache slot (experts.expert_rows), pinned when the compute device is
     a GPU, so a miss is one copy (converted to the compute dtype on the way when the two differ); a budget
     of device slots.
Out: the `ExpertProvider` protocol: fetch(layer, experts) yields each expert from a slot. A miss takes the
     least recently used slot and copies the expert into it synchronously (the host waits until the copy
     has landed) on the compute stream, so every missed byte sits on the critical path: no prefetch, no
     overlap with compute, no compression.

Counters go to an `OffloadStats` like the compressed runtime's: hits, misses, bytes copied, and the time
compute waited for copies (all of the copy time, since the copy is synchronous).
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, Sequence

import torch

from moeserve.experts import ExpertWeights, expert_row_numel, expert_rows
from moeserve.offload.cache import ExpertCache, ExpertKey, SlotPool
from moeserve.offload.stats import OffloadStats

# Legend: D = hidden size, I = expert width, N = experts.expert_row_numel values of one slot row.


class NaiveOffloadProvider:
    prediction_depth = 0  # loads happen only when a layer asks

    def __init__(self, host: dict[ExpertKey, torch.Tensor], pool: SlotPool):
        self.host = host  # (layer, expert) → [N] in the stored dtype, host memory
        self.pool = pool
        self.cache = ExpertCache(pool.num_slots, eviction="lru")
        self.stats = OffloadStats()

    def fetch(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        for expert in experts:
            key = (layer, expert)
            entry = self.cache.get(key)
            if entry is not None:
                self.stats.hits += 1
                self.cache.touch(key)
            else:
                self.stats.misses += 1
                # Nothing is pinned here, so the LRU slot is always free to take: the expert it held
                # was consumed earlier, and the copy below is ordered after that compute on the stream.
                entry = self.cache.claim(key, prefetched=False)
                source = self.host[key]
                start = time.perf_counter()
                # Blocking: returns once the bytes are on the device (and in the compute dtype).
                self.pool.memory[entry.slot].copy_(source)
                self.stats.wait_seconds += time.perf_counter() - start
                self.stats.bytes_transferred += source.numel() * source.element_size()
                self.stats.miss_bytes += source.numel() * source.element_size()
            yield expert, self.pool.weights(entry.slot)

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        pass

    def stacked(self, layer: int) -> None:
        return None  # the naive pattern: fetch, copy, compute, one expert at a time


def host_copies(experts: Iterator[tuple[int, Iterable[ExpertWeights]]], pin: bool) -> dict[ExpertKey, torch.Tensor]:
    """Every expert as one host row, taken from the experts' source one expert at a time."""
    return {(layer, expert): host_copy(w, pin) for layer, weights in experts for expert, w in enumerate(weights)}


def host_copy(w: ExpertWeights, pin: bool) -> torch.Tensor:
    """One expert as a slot row [N] (gate and up fused, down in its aligned region), in its stored dtype,
    in (pinned) host memory."""
    intermediate, hidden = w.gate.shape
    row = torch.zeros(1, expert_row_numel(intermediate, hidden, w.gate.dtype), dtype=w.gate.dtype, pin_memory=pin)
    gate_up, down = expert_rows(row, intermediate, hidden)
    # from the device or a mapped file
    gate_up[0, :intermediate].copy_(w.gate)
    gate_up[0, intermediate:].copy_(w.up)
    down[0].copy_(w.down)
    return row[0]
