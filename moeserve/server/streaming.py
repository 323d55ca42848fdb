"""Server-sent events, and a response that notices a client going away.

In:  response chunks as dicts; the text in them is the engine's text deltas (`SeqUpdate.text_delta`),
     which never have to be taken back: the engine holds back a tail that could start a stop string.
Out: `data: <json>\\n\\n` events, ending with `data: [DONE]\\n\\n`.

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
