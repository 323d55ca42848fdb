"""Counters of the offloading runtime, read by benchmarks and exported by the server's /metrics."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class OffloadStats:
    hits: int = 0  # requested experts already in (or on their way into) a cache slot
    misses: int = 0  # requested experts that had to be loaded on demand
    prefetches_issued: int = 0
    prefetches_used: int = 0  # prefetched experts that a later fetch actually consumed
    bytes_transferred: int = 0  # compressed bytes moved host → decode (H2D on a GPU)
    decode_seconds: float = 0.0  # time spent decoding, summed over workers / streams
    wait_seconds: float = 0.0  # time the host blocked waiting for an expert (CPU decodes)
    # GPU timeline (measured with timing events when the runtime is built with timeline=True):
    copy_seconds: float = 0.0  # copy engine busy moving compressed bytes host → device
    compute_wait_seconds: float = 0.0  # time the compute stream stood still waiting for a decode
    miss_bytes: int = 0  # compressed bytes of demand loads
    prefetch_used_bytes: int = 0  # compressed bytes of guesses a fetch consumed
    prefetch_bytes: int = 0  # compressed bytes moved for guesses
    prefetch_bytes_wasted: int = 0  # of those, bytes of guesses evicted before any fetch used them
    # Per distance (1: the next MoE layer, 2: the one after, ...): guesses issued, and of those, used.
    prefetches_issued_at: dict[int, int] = field(default_factory=dict)
    prefetches_used_at: dict[int, int] = field(default_factory=dict)
    bits_per_value: dict[int, float] = field(default_factory=dict)  # per MoE layer, from the store
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_decode_time(self, seconds: float) -> None:
        with self._lock:  # decode workers run in parallel
            self.decode_seconds += seconds

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def needed_bytes(self) -> int:
        """Bytes a perfect pipeline must move: the experts used that were not cached before they were
        wanted (demand loads and consumed guesses). Wrong guesses are not in it: they cost, never count."""
        return self.miss_bytes + self.prefetch_used_bytes

    @property
    def prefetch_precision(self) -> float:
        """Share of issued guesses that a fetch used."""
        return self.prefetches_used / self.prefetches_issued if self.prefetches_issued else 0.0

    def snapshot(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        for name in ("bits_per_value", "prefetches_issued_at", "prefetches_used_at"):
            data[name] = dict(getattr(self, name))
        data["hit_rate"] = self.hit_rate
        data["prefetch_precision"] = self.prefetch_precision
        return data

    def reset(self) -> None:
        with self._lock:
            self.hits = self.misses = self.prefetches_issued = self.prefetches_used = self.bytes_transferred = 0
            self.prefetch_bytes = self.prefetch_bytes_wasted = self.miss_bytes = self.prefetch_used_bytes = 0
            self.prefetches_issued_at, self.prefetches_used_at = {}, {}
            self.decode_seconds = self.wait_seconds = self.copy_seconds = self.compute_wait_seconds = 0.0
