"""Streams and events without a GPU, that check every ordering the real device would have to respect.

Each fake stream keeps a vector clock: one counter per stream, raised by each operation queued on it.
Recording an event snapshots the clock; waiting for an event merges the snapshot into the waiting
stream's clock. Operation A is then ordered before operation B exactly when B's clock has seen A's
place on A's stream: what CUDA guarantees, and nothing more. Every operation declares the bytes it
reads and writes; two that touch the same bytes, one of them writing, with neither ordered before the
other, are a race (`races`). Operations run at once on the CPU, in the order the host queues them, so
results can also be compared with a reference.

By default every queued operation counts as finished at once (`query` is true once an event is
recorded). With `lagging=True` the device runs behind the host: an event is done only once the test
calls `finish()` (the device catches up) or the host synchronizes on it, so `link_idle` and
`DevicePending.done` see work still in flight.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from moeserve.codecs import decode_into

_ids = itertools.count()


@dataclass(eq=False)
class FakeStream:
    name: str
    clock: dict[int, int] = field(default_factory=dict)
    id: int = field(default_factory=lambda: next(_ids))
    owner: FakeStreams | None = None

    def synchronize(self) -> None:
        self.owner.host_waits += 1
        self.owner.finished[self.id] = self.clock.get(self.id, 0)


@dataclass(eq=False)
class FakeEvent:
    timing: bool
    clock: dict[int, int] | None = None  # None until recorded
    time: float = 0.0


@dataclass
class Access:
    stream: FakeStream
    place: int  # the operation's count on its stream
    seen: dict[int, int]  # the stream's clock when it was queued
    ranges: list[tuple[int, int]]
    write: bool
    what: str


def byte_range(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


class FakeStreams:
    def __init__(self, compute_name: str = "compute", lagging: bool = False):
        self.lagging = lagging
        self.finished: dict[int, int] = {}  # per stream id, how many of its operations the device has finished
        self.streams: list[FakeStream] = []
        self.compute = self.new_stream(compute_name)
        self.accesses: list[Access] = []
        self.races: list[str] = []
        self.host_waits = 0
        self.copies = 0
        self.now = 0.0  # a clock for elapsed_seconds: each operation takes one unit

    # the Streams interface of moeserve/offload/streams.py
    def new_stream(self, name: str = "side") -> FakeStream:
        stream = FakeStream(name=name, owner=self)
        self.streams.append(stream)
        return stream

    def new_event(self, timing: bool = False) -> FakeEvent:
        return FakeEvent(timing)

    def current_stream(self) -> FakeStream:
        return self.compute

    def record(self, event: FakeEvent, stream: FakeStream) -> None:
        event.clock = dict(stream.clock)
        event.time = self.now

    def wait(self, stream: FakeStream, event: FakeEvent) -> None:
        assert event.clock is not None, "waiting for an event that was never recorded"
        for key, value in event.clock.items():
            stream.clock[key] = max(stream.clock.get(key, 0), value)

    def query(self, event: FakeEvent) -> bool:
        if event.clock is None:
            return False
        return not self.lagging or all(self.finished.get(key, 0) >= value for key, value in event.clock.items())

    def synchronize(self, event: FakeEvent) -> None:
        self.host_waits += 1
        for key, value in event.clock.items():
            self.finished[key] = max(self.finished.get(key, 0), value)

    # what the device does on its own
    def finish(self) -> None:
        """The device catches up: every operation queued so far has finished."""
        for stream in self.streams:
            self.finished[stream.id] = stream.clock.get(stream.id, 0)

    def idle(self, stream: FakeStream) -> bool:
        """Whether every operation queued on `stream` has finished."""
        return not self.lagging or self.finished.get(stream.id, 0) >= stream.clock.get(stream.id, 0)

    def elapsed_seconds(self, start: FakeEvent, end: FakeEvent) -> float:
        return end.time - start.time

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: FakeStream) -> None:
        assert src.device.type == "cpu"
        self._access(stream, [dst], write=True, what="copy into staging")
        dst.copy_(src)
        self.copies += 1

    def decode(self, blob, out: torch.Tensor, stream: FakeStream) -> None:
        self._access(stream, [blob.payload], write=False, what="decode reads staging")
        self._access(stream, [out], write=True, what="decode writes a slot")
        decode_into(blob, out)

    # what the model does between fetches
    def compute_reads(self, tensors: list[torch.Tensor]) -> None:
        self._access(self.compute, tensors, write=False, what="compute reads a slot")

    def _access(self, stream: FakeStream, tensors: list[torch.Tensor], write: bool, what: str) -> None:
        stream.clock[stream.id] = stream.clock.get(stream.id, 0) + 1
        self.now += 1
        new = Access(stream, stream.clock[stream.id], dict(stream.clock), [byte_range(t) for t in tensors], write, what)
        for old in self.accesses:
            if not (old.write or new.write) or not _overlap(old.ranges, new.ranges):
                continue
            if new.seen.get(old.stream.id, 0) < old.place:
                self.races.append(f"{new.what} on {new.stream.name} is not ordered after {old.what} on {old.stream.name}")
        self.accesses.append(new)


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)
