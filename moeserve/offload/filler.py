"""Fills cache slots from the compressed store on the CPU, off the compute path.

In:  a packed expert (host memory) and a free slot of the pool.
Out: a `CpuPending` handle; once it is done the slot holds the decoded gate / up / down.

Decode threads (decode_pool.py; for szp, C++ threads that never take the GIL) write straight
into the slot, so decoding overlaps the model's own compute. The GPU pipeline is gpu_filler.py.
"""

from __future__ import annotations

import os

import torch

from moeserve.codecs import NativeDecoder, check_decode_target
from moeserve.offload.decode_pool import CpuDecodePool, DecodeHandle, shared_native_decoder
from moeserve.offload.cache import SlotPool
from moeserve.offload.stats import OffloadStats
from moeserve.offload.store import PackedExpert


class CpuPending:
    """Completion of one slot fill by the CPU decode workers."""

    def __init__(self, decode: DecodeHandle):
        self._decode = decode

    def done(self) -> bool:
        return self._decode.done()

    def wait(self) -> None:
        self._decode.wait()  # re-raises a decode error here, in the model's thread

    synchronize = wait


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
    guesses_evict = True  # see OffloadedExpertProvider._start
    guesses_cost_compute = True  # the decode workers share the cores with compute (OffloadedExpertProvider.prediction_depth)

    def __init__(self, pool: SlotPool, stats: OffloadStats, workers: int | None = None):
        workers = default_decode_workers() if workers is None else workers
        self.pool, self.stats, self.workers = pool, stats, workers
        # With a core to spare, a worker starts a miss at once (overlapping the hits computed meanwhile); on a
        # machine the compute threads and the workers fill, the waiting thread decodes it itself.
        self._decoders = CpuDecodePool(workers, spare_cores=usable_cores() > torch.get_num_threads() + workers)
        self._running: list[DecodeHandle] = []
        # What the native decoder reads per packed expert (id → the expert, the decoder, one source per blob)
        # and writes per slot (slot → one target per matrix), made on first use: the same experts go into the
        # same slots over and over. None: no native decoder.
        self._sources: dict[int, tuple[PackedExpert, NativeDecoder | None, list]] = {}
        self._targets: dict[int, list] = {}

    def start(self, packed: PackedExpert, slot: int, urgent: bool) -> CpuPending:
        """Queues the fill; an urgent one (a layer waits for it) is decoded before queued prefetches."""
        self._collect_timing()
        _, decoder, sources = self._source(packed)
        weights = self.pool.weights(slot)
        outs = (weights.gate, weights.up, weights.down)
        if decoder is None:
            handle = self._decoders.submit(list(zip(packed.blobs, outs)), urgent)
        else:
            targets = self._targets.get(slot)
            if targets is None:
                targets = self._targets[slot] = [decoder.target(out) for out in outs]
            jobs = [decoder.job(source, target) for source, target in zip(sources, targets)]
            handle = self._decoders.submit_native(decoder, jobs, urgent)
        self._running.append(handle)
        self.stats.bytes_transferred += packed.nbytes
        return CpuPending(handle)

    def _source(self, packed: PackedExpert) -> tuple[PackedExpert, NativeDecoder | None, list]:
        known = self._sources.get(id(packed))
        if known is None or known[0] is not packed:
            weights = self.pool.weights(0)
            for blob, out in zip(packed.blobs, (weights.gate, weights.up, weights.down)):
                check_decode_target(blob, out, cpu_only=True)  # every slot's views share these shapes
            # an empty matrix would not reach the native pool (submit drops it); such experts go through submit
            decoder = shared_native_decoder(packed.blobs) if all(blob.numel for blob in packed.blobs) else None
            sources = [] if decoder is None else [decoder.source(blob) for blob in packed.blobs]
            known = self._sources[id(packed)] = (packed, decoder, sources)
        return known

    def release(self, slot: int) -> None:
        """Nothing to order: on the CPU, compute has finished reading a slot when it asks for the next."""

    def link_idle(self) -> bool:
        """Guesses queue behind demand decodes (urgent ones go first), so a guess never delays one."""
        return True

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
