"""Server-sent events: incremental text that never has to be taken back, and a response that
notices a client going away.

In:  each sequence's full text so far (from `SeqUpdate.text`; a matched stop string already cut).
Out: `data: <json>\\n\\n` events, ending with `data: [DONE]\\n\\n`.

With stop strings, the last (longest stop string − 1) characters are held back until the sequence
finishes or more text follows: they could still turn out to be the start of a stop string that the
final answer drops, and a streamed client must never have seen them (vLLM does the same).

`EventStream` runs the body and a disconnect listener side by side, for every ASGI server: when
the client disconnects the body generator is cancelled at once, and its `finally` aborts the
request, which frees the sequences' KV cache rows and scheduler slots.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class TextStreamer:
    """Per choice: how much of the text was sent, and the tail held back for stop strings."""

    def __init__(self, stop: list[str]):
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.sent = 0

    def delta(self, text: str, finished: bool) -> str:
        end = len(text) if finished else max(self.sent, len(text) - self.holdback)
        piece = text[self.sent : end]
        self.sent = end
        return piece


class EventStream(StreamingResponse):
    """A text/event-stream response whose body is cancelled when the client disconnects."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None] | None = None, headers=None):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **(headers or {})}
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def body() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away while we wrote
                    group.cancel_scope.cancel()

                group.start_soon(body)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            # The body generator may not have run its `finally` yet (cancelled before its first
            # step): the request is aborted here too; aborting twice is harmless.
            if self._on_close is not None:
                self._on_close()


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T | None:
    """Await `work`, cancelling it if the client disconnects first (then None). For non-streamed
    responses: the request body was read, so the next ASGI message can only be the disconnect."""
    task = asyncio.ensure_future(work)

    async def listen() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    listener = asyncio.ensure_future(listen())
    try:
        return await task
    except asyncio.CancelledError:
        if listener.done() and not listener.cancelled():
            return None  # the client left: the work was cancelled (and aborted its request)
        raise
    finally:
        listener.cancel()
