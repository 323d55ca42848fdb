"""Background CPU decoding into caller-owned tensors, for the offloading runtime's slot filler.

In:  one unit of work: (blob, out) pairs, e.g. an expert's gate, up and down and the slot views they fill.
Out: a `DecodeHandle` to poll (done) or block on (wait); once done every out holds its decoded values.

A unit whose blobs all share a codec with a native decoder (`Codec.native_decoder()`, e.g. szp's C++
threads) runs there, without the GIL, so decoding does not stall the model's Python thread between its
torch calls. Other codecs run their Python decoders on threads of their own. Units a layer is waiting
for run before queued guesses, and a native unit no worker has started runs on the thread that waits for it. Either way each worker decodes on its own thread only: the workers are
the parallelism, and an OpenMP team per worker would oversubscribe the cores the model computes on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Sequence

import torch

from moeserve.codecs import Blob, NativeDecoder, check_decode_target, decode_into, single_threaded_codecs
from moeserve.codecs.registry import get


class DecodeHandle:
    def __init__(self, native=None, decoder: NativeDecoder | None = None, future: Future | None = None):
        self._native, self._decoder, self._future = native, decoder, future

    def done(self) -> bool:
        return self._native.done() if self._native is not None else self._future.done()

    def wait(self) -> None:
        """Blocks until decoded; raises CodecError for a malformed blob, here in the caller's thread."""
        if self._native is None:
            self._future.result()
            return
        try:
            self._native.wait()
        except ValueError as e:
            raise self._decoder.error(e) from None

    @property
    def seconds(self) -> float:
        """Time the worker spent decoding; valid once done(). Never raises: a failed decode reports its
        error from wait(), in the caller that needs the values."""
        if self._native is not None:
            return self._native.seconds
        return self._future.result() if self._future.exception() is None else 0.0


def shared_native_decoder(blobs: Sequence[Blob]) -> NativeDecoder | None:
    """The native decoder that serves every one of `blobs` (one codec's), or None: no blobs, codecs without
    one, or codecs with different ones (such a unit runs on the Python decode threads)."""
    decoders = {get(blob.codec).native_decoder() for blob in blobs}
    return decoders.pop() if len(decoders) == 1 else None


class CpuDecodePool:
    def __init__(self, threads: int = 1, spare_cores: bool = True):
        """`spare_cores`: whether the machine has cores beyond the compute threads and these (NativeDecoder)."""
        self.threads, self.spare_cores = threads, spare_cores
        self._native: dict[str, object] = {}  # decoder name → its pool, started on first use
        self._python: _PythonDecodeThreads | None = None

    def submit(self, work: Sequence[tuple[Blob, torch.Tensor]], urgent: bool = False) -> DecodeHandle:
        """Queues one unit; an urgent one (something waits for it) runs before every queued unit that is not."""
        for blob, out in work:
            check_decode_target(blob, out, cpu_only=True)
        work = [(blob, out) for blob, out in work if out.numel()]
        decoder = shared_native_decoder([blob for blob, _ in work])
        if decoder is not None:
            jobs = [decoder.job(decoder.source(blob), decoder.target(out)) for blob, out in work]
            return self.submit_native(decoder, jobs, urgent)
        if self._python is None:
            self._python = _PythonDecodeThreads(self.threads)
        return DecodeHandle(future=self._python.submit(work, urgent))

    def submit_native(self, decoder: NativeDecoder, jobs: list, urgent: bool = False) -> DecodeHandle:
        """`submit` for a caller that made the native jobs itself (`decoder.job` of checked, nonempty pairs),
        e.g. from sources and targets it keeps: the offloading filler decodes the same blobs into the same
        slots over and over, and making the jobs anew cost more than a small expert's decode."""
        if decoder.name not in self._native:
            self._native[decoder.name] = decoder.start_pool(self.threads, self.spare_cores)
        return DecodeHandle(native=self._native[decoder.name].submit(jobs, urgent), decoder=decoder)

    def close(self) -> None:
        """Finishes every submitted unit, then stops the threads."""
        for pool in self._native.values():
            pool.close()
        if self._python is not None:
            self._python.close()


class _PythonDecodeThreads:
    """Threads running the codecs' Python decoders, in the native pool's order: urgent units first."""

    def __init__(self, threads: int):
        self._queue: deque[tuple[list, Future]] = deque()
        self._urgent_queued = 0
        self._changed = threading.Condition()
        self._closing = False
        self._threads = [
            threading.Thread(target=self._work, name="moeserve-decode", daemon=True) for _ in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, work: list[tuple[Blob, torch.Tensor]], urgent: bool) -> Future:
        future: Future = Future()
        with self._changed:
            if self._closing:
                raise RuntimeError("the decode threads are closed")
            if urgent:
                self._queue.insert(self._urgent_queued, (work, future))
                self._urgent_queued += 1
            else:
                self._queue.append((work, future))
            self._changed.notify()
        return future

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        single_threaded_codecs()
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._closing or self._queue)
                if not self._queue:
                    return  # closing, and every submitted unit has run
                work, future = self._queue.popleft()
                self._urgent_queued = max(0, self._urgent_queued - 1)
            try:
                start = time.perf_counter()
                for blob, out in work:
                    decode_into(blob, out)
                future.set_result(time.perf_counter() - start)
            except BaseException as error:  # handed to the waiting caller, in its thread
                future.set_exception(error)
