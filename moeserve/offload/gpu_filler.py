"""Fills device cache slots from the compressed host store as a pipeline: copy, decode and compute overlap.

In:  a packed expert (pinned host bytes) and the cache slot it goes to; `release(slot)` once compute
     has queued its last read of a slot.
Out: a `DevicePending` whose event marks the slot's weights as decoded; compute waits for that one event.

Three streams, and the host never blocks on the hot path:
  copy stream     pinned host → a range of the device staging ring (the copy engine)
  decode stream   staging range → slot, by the codec's kernels (the SMs)
  compute stream  the model's, which waits per expert on that expert's decode event
The copy of expert i+1 runs while expert i decodes and expert i-1 computes. Each wait is on the one
event that matters, never on a whole stream: a copy waits for the decode that last read its staging
range, a decode for the copy of its own bytes and for the last compute kernel that read its slot
(`release` records that event). Staging ranges are handed out in ring order; decodes finish in the
order they are queued (one decode stream), so waiting for the newest decode that read a range implies
every older one has finished too.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from moeserve.offload.cache import SlotPool
from moeserve.offload.stats import OffloadStats
from moeserve.offload.store import PackedExpert, packed_payload_view
from moeserve.offload.streams import Streams

STAGING_EXPERTS = 4  # staging ring capacity, in the largest packed expert: fills that can be in flight at once


class DevicePending:
    """One fill on the device: done once its decode event has passed."""

    def __init__(self, streams: Streams, decoded: Any, timing: list | None = None):
        self._streams, self._decoded, self._timing = streams, decoded, timing

    def done(self) -> bool:
        return self._streams.query(self._decoded)

    def wait(self) -> None:
        """Order compute after the decode; the host goes on at once. With a timeline, events around
        the wait measure how long compute stood still for it."""
        streams, compute = self._streams, self._streams.current_stream()
        if self._timing is None:
            streams.wait(compute, self._decoded)
            return
        before, after = streams.new_event(True), streams.new_event(True)
        streams.record(before, compute)
        streams.wait(compute, self._decoded)
        streams.record(after, compute)
        self._timing.append(("wait", before, after))

    def synchronize(self) -> None:
        """Block the host until the slot is filled (only where every slot is taken and one must free)."""
        self._streams.synchronize(self._decoded)


class StagingRing:
    """Byte ranges of the device staging buffer, handed out in order and wrapping at its end."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._head = 0
        self._occupied: deque[tuple[int, int, Any]] = deque()  # (start, end, last reader's event), oldest first

    def reserve(self, nbytes: int, released: Any) -> tuple[int, Any | None]:
        """A range of `nbytes` that will be free once `released` passes; returns its start and the
        event the new range's writer must wait for (None: the range was never used)."""
        if nbytes > self.capacity:
            raise ValueError(f"a packed expert of {nbytes} bytes does not fit the {self.capacity}-byte staging ring")
        start = self._head if self._head + nbytes <= self.capacity else 0
        end = start + nbytes
        overlapping = [i for i, (s, e, _) in enumerate(self._occupied) if s < end and start < e]
        must_wait = None
        if overlapping:
            newest = overlapping[-1]
            must_wait = self._occupied[newest][2]
            # Its reader finished after every older one (one decode stream, in order): forget them all.
            for _ in range(newest + 1):
                self._occupied.popleft()
        self._occupied.append((start, end, released))
        self._head = end
        return start, must_wait


class GpuSlotFiller:
    guesses_evict = False  # see OffloadedExpertProvider._start
    guesses_cost_compute = False  # a guess only uses an idle link and the decode stream (see prediction_depth)

    def __init__(
        self,
        pool: SlotPool,
        stats: OffloadStats,
        max_packed_nbytes: int,
        streams: Streams,
        staging_experts: int = STAGING_EXPERTS,
        timeline: bool = False,
    ):
        self.pool, self.stats, self.streams = pool, stats, streams
        self.copy_stream = streams.new_stream()
        self.decode_stream = streams.new_stream()
        capacity = staging_experts * _aligned(max_packed_nbytes)
        # Allocated once; every fill's bytes land in a range of it.
        self.staging = torch.empty(capacity, dtype=torch.uint8, device=pool.memory.device)
        self._ring = StagingRing(capacity)
        self._slot_read: list[Any | None] = [None] * pool.num_slots  # after the last compute read of each slot
        self._last_copy: Any | None = None
        self._timeline = timeline  # events with timing: copy and decode busy time (benchmarks)
        self._timing: list[tuple[str, Any, Any]] = []

    def start(self, packed: PackedExpert, slot: int, urgent: bool) -> DevicePending:
        """Queue the copy and the decode of one expert into `slot`; returns at once."""
        del urgent  # demand loads never queue behind guesses: the provider guesses only onto an idle link
        streams = self.streams
        self.collect_timing()
        decoded = streams.new_event(self._timeline)
        start, range_free = self._ring.reserve(_aligned(packed.nbytes), decoded)
        staged = self.staging[start : start + packed.nbytes]
        if range_free is not None:
            streams.wait(self.copy_stream, range_free)
        copy_begin = self._mark(self.copy_stream)
        streams.copy(staged, packed.data, self.copy_stream)
        copied = streams.new_event(self._timeline)
        streams.record(copied, self.copy_stream)
        self._last_copy = copied

        streams.wait(self.decode_stream, copied)
        if self._slot_read[slot] is not None:
            streams.wait(self.decode_stream, self._slot_read[slot])
        decode_begin = self._mark(self.decode_stream)
        weights = self.pool.weights(slot)
        for blob, out in zip(packed_payload_view(packed, staged), (weights.gate, weights.up, weights.down)):
            streams.decode(blob, out, self.decode_stream)
        streams.record(decoded, self.decode_stream)
        if self._timeline:
            self._timing += [("copy", copy_begin, copied), ("decode", decode_begin, decoded)]
        self.stats.bytes_transferred += packed.nbytes
        return DevicePending(streams, decoded, self._timing if self._timeline else None)

    def release(self, slot: int) -> None:
        """Compute has queued its last read of `slot`: a later fill of it waits for exactly that."""
        read = self.streams.new_event()
        self.streams.record(read, self.streams.current_stream())
        self._slot_read[slot] = read

    def link_idle(self) -> bool:
        """Whether every queued copy has finished: a guess started now delays no demand load."""
        return self._last_copy is None or self.streams.query(self._last_copy)

    def _mark(self, stream: Any) -> Any | None:
        if not self._timeline:
            return None
        event = self.streams.new_event(True)
        self.streams.record(event, stream)
        return event

    def collect_timing(self) -> None:
        """Add the finished fills' copy, decode and wait times to the stats."""
        still_running = []
        for kind, begin, end in self._timing:
            if self.streams.query(end):
                seconds = self.streams.elapsed_seconds(begin, end)
                if kind == "copy":
                    self.stats.copy_seconds += seconds
                elif kind == "decode":
                    self.stats.add_decode_time(seconds)
                else:
                    self.stats.compute_wait_seconds += seconds
            else:
                still_running.append((kind, begin, end))
        self._timing = still_running

    def close(self) -> None:
        for stream in (self.copy_stream, self.decode_stream):
            stream.synchronize()
        self.collect_timing()


def _aligned(nbytes: int) -> int:
    """Staging ranges start 8-byte aligned: the decode kernels read blob payloads as 64-bit words."""
    return -(-nbytes // 8) * 8
