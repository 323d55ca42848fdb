"""Fills cache slots from the compressed store, off the compute path.

In:  a packed expert (host memory) and a free slot of the pool.
Out: a `Pending` handle; once it is done the slot holds the decoded gate / up / down.

CPU: decode threads (decode_pool.py; for szp, C++ threads that never take the GIL) write
straight into the slot, so decoding overlaps the model's own compute. GPU: one host→device copy of the
packed buffer into a staging ring and the device decoder into the slot, both on a dedicated
prefetch stream; an event marks completion and the compute stream waits on it (the host does
not block unless it has to).
"""

from __future__ import annotations

import os

import torch

from moeserve.codecs import decode_into
from moeserve.offload.decode_pool import CpuDecodePool, DecodeHandle
from moeserve.offload.cache import SlotPool
from moeserve.offload.stats import OffloadStats
from moeserve.offload.store import PackedExpert, packed_payload_view


class Pending:
    """Completion of one slot fill, with the same two questions for CPU decodes and CUDA events."""

    def __init__(self, decode: DecodeHandle | None = None, event: torch.cuda.Event | None = None):
        self._decode, self._event = decode, event

    def done(self) -> bool:
        return self._decode.done() if self._decode is not None else self._event.query()

    def wait(self) -> None:
        """Make the slot usable by compute: block on a CPU decode, or order the compute stream
        after the GPU decode and block the host only until it finishes."""
        if self._decode is not None:
            self._decode.wait()  # re-raises a decode error here, in the model's thread
        else:
            torch.cuda.current_stream().wait_event(self._event)
            self._event.synchronize()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_decode_workers(cores: int | None = None) -> int:
    """CPU decode workers: one per 8 usable cores, and at least two, so that a layer's miss never waits
    behind a prefetch another worker is decoding."""
    return max(2, (usable_cores() if cores is None else cores) // 8)


def leave_cores_for_decoding(workers: int) -> None:
    """Caps torch's intra-op threads at the usable cores minus `workers` (at least 1).

    Between its parallel regions torch's OpenMP threads spin on their cores, so a decode worker that
    shares a core with one gets it only part of the time: on 2 cores the embedded model at a 25% cache
    ran at 0.57-0.61x resident speed with torch at 2 threads and 0.69x at 1 (bench/offload.py).
    For process owners (the CLI, benchmarks) only: the setting is process-wide and matmul results
    depend on it, so a library call must not change it under a caller who compares runs."""
    limit = max(1, usable_cores() - workers)
    if torch.get_num_threads() > limit:
        torch.set_num_threads(limit)


class CpuSlotFiller:
    def __init__(self, pool: SlotPool, stats: OffloadStats, workers: int | None = None):
        workers = default_decode_workers() if workers is None else workers
        self.pool, self.stats, self.workers = pool, stats, workers
        self._decoders = CpuDecodePool(workers)
        self._running: list[DecodeHandle] = []

    def start(self, packed: PackedExpert, slot: int, urgent: bool) -> Pending:
        """Queues the fill; an urgent one (a layer waits for it) is decoded before queued prefetches."""
        self._collect_timing()
        weights = self.pool.weights(slot)
        handle = self._decoders.submit(list(zip(packed.blobs, (weights.gate, weights.up, weights.down))), urgent)
        self._running.append(handle)
        self.stats.bytes_transferred += packed.nbytes
        return Pending(decode=handle)

    def _collect_timing(self) -> None:
        still_running = []
        for handle in self._running:
            if handle.done():
                self.stats.add_decode_time(handle.seconds)
            else:
                still_running.append(handle)
        self._running = still_running

    def close(self) -> None:
        self._decoders.close()
        self._collect_timing()


class CudaSlotFiller:
    def __init__(self, pool: SlotPool, stats: OffloadStats, max_packed_nbytes: int, ring: int = 4):
        self.pool, self.stats = pool, stats
        device = pool.memory.device
        self.stream = torch.cuda.Stream(device)
        # Staging for compressed bytes, allocated once: `ring` experts can be in flight at a time.
        self._staging = torch.empty(ring, max_packed_nbytes, dtype=torch.uint8, device=device)
        self._staging_free: list[torch.cuda.Event | None] = [None] * ring
        self._next = 0
        self._timing: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self, packed: PackedExpert, slot: int, urgent: bool) -> Pending:
        """Queues the fill on the prefetch stream, where fills run in the order they are started."""
        index = self._next
        self._next = (self._next + 1) % len(self._staging_free)
        previous = self._staging_free[index]
        if previous is not None:
            previous.synchronize()  # that staging row's last decode must have read it
        self._collect_timing()
        weights = self.pool.weights(slot)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            # The slot may still be read by compute queued before its eviction.
            self.stream.wait_stream(torch.cuda.current_stream(self.pool.memory.device))
            staged = self._staging[index, : packed.nbytes]
            staged.copy_(packed.data, non_blocking=True)  # pinned host → device, one copy per expert
            begin.record(self.stream)
            for blob, out in zip(packed_payload_view(packed, staged), (weights.gate, weights.up, weights.down)):
                decode_into(blob, out, self.stream)
            end.record(self.stream)
        self._staging_free[index] = end
        self._timing.append((begin, end))
        self.stats.bytes_transferred += packed.nbytes
        return Pending(event=end)

    def _collect_timing(self) -> None:
        still_running = []
        for begin, end in self._timing:
            if end.query():
                self.stats.add_decode_time(begin.elapsed_time(end) / 1000.0)
            else:
                still_running.append((begin, end))
        self._timing = still_running

    def close(self) -> None:
        self.stream.synchronize()
        self._collect_timing()
