"""Fills cache slots from the compressed store, off the compute path.

In:  a packed expert (host memory) and a free slot of the pool.
Out: a `Pending` handle; once it is done the slot holds the decoded gate / up / down.

CPU: worker threads run the codecs' decoders (the szp C++ decoder releases the GIL) straight
into the slot, so decoding overlaps the model's own compute. GPU: one host→device copy of the
packed buffer into a staging ring and the device decoder into the slot, both on a dedicated
prefetch stream; an event marks completion and the compute stream waits on it (the host does
not block unless it has to).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from moeserve.codecs import decode_into, single_threaded_codecs
from moeserve.offload.cache import SlotPool
from moeserve.offload.stats import OffloadStats
from moeserve.offload.store import PackedExpert, packed_payload_view


class Pending:
    """Completion of one slot fill, with the same two questions for CPU futures and CUDA events."""

    def __init__(self, future: Future | None = None, event: torch.cuda.Event | None = None):
        self._future, self._event = future, event

    def done(self) -> bool:
        return self._future.done() if self._future is not None else self._event.query()

    def wait(self) -> None:
        """Make the slot usable by compute: block on a CPU decode, or order the compute stream
        after the GPU decode and block the host only until it finishes."""
        if self._future is not None:
            self._future.result()  # re-raises a decode error here, in the model's thread
        else:
            torch.cuda.current_stream().wait_event(self._event)
            self._event.synchronize()


class CpuSlotFiller:
    def __init__(self, pool: SlotPool, stats: OffloadStats, workers: int = 2):
        self.pool, self.stats = pool, stats
        # Each worker decodes on its own thread only: the workers are the parallelism, and an OpenMP
        # team per worker would oversubscribe the cores the model computes on.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moeserve-decode",
                                            initializer=single_threaded_codecs)

    def start(self, packed: PackedExpert, slot: int) -> Pending:
        self.stats.bytes_transferred += packed.nbytes
        return Pending(future=self._executor.submit(self._decode, packed, slot))

    def _decode(self, packed: PackedExpert, slot: int) -> None:
        start = time.perf_counter()
        weights = self.pool.weights(slot)
        for blob, out in zip(packed.blobs, (weights.gate, weights.up, weights.down)):
            decode_into(blob, out)
        self.stats.add_decode_time(time.perf_counter() - start)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


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

    def start(self, packed: PackedExpert, slot: int) -> Pending:
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
