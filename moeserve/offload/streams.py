"""The few stream operations the GPU fill pipeline needs, behind one small interface.

In:  the pipeline's requests: a new stream or event, record an event on a stream, make a stream wait
     for an event (on the device, the host does not block), an asynchronous host→device copy, a codec
     decode ordered on a stream.
Out: `CudaStreams` does them with torch.cuda. Tests hand the pipeline a fake with the same methods
     that tracks which stream ordered what (tests/fake_streams.py), so the pipeline's ordering, slot
     reuse and host waits are checked on a machine without a GPU.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from moeserve.codecs import Blob, decode_into


class Streams(Protocol):
    def new_stream(self) -> Any: ...

    def new_event(self, timing: bool = False) -> Any: ...

    def current_stream(self) -> Any:
        """The stream compute is queued on (the model's)."""
        ...

    def record(self, event: Any, stream: Any) -> None: ...

    def wait(self, stream: Any, event: Any) -> None:
        """Work queued on `stream` from now on starts after `event`; the host goes on at once."""
        ...

    def query(self, event: Any) -> bool: ...

    def synchronize(self, event: Any) -> None:
        """Block the host until `event` has passed (off the hot path only)."""
        ...

    def elapsed_seconds(self, start: Any, end: Any) -> float: ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        """Asynchronous copy of pinned host bytes `src` into device bytes `dst`, ordered on `stream`."""
        ...

    def decode(self, blob: Blob, out: torch.Tensor, stream: Any) -> None:
        """Decode `blob` (payload already on the device) into `out`, ordered on `stream`."""
        ...


class CudaStreams:
    def __init__(self, device: torch.device):
        self.device = device

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def new_event(self, timing: bool = False) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=timing)

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def record(self, event: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
        event.record(stream)

    def wait(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def query(self, event: torch.cuda.Event) -> bool:
        return event.query()

    def synchronize(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def elapsed_seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1000.0

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def decode(self, blob: Blob, out: torch.Tensor, stream: torch.cuda.Stream) -> None:
        decode_into(blob, out, stream)
