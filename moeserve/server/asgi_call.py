"""One HTTP request run through an ASGI app in this process, its response as a stream of ASGI messages.

In:  a `ForwardedRequest` (method, path, query, headers, body: plain data that crosses a Ray handle) and an
     ASGI app (the app `create_app` builds).
Out: the app's `send` messages, `http.response.start` then `http.response.body` ones, as they are sent.

This is how a Ray Serve replica serves a request with exactly the single-process app (middleware, routes,
errors, streaming): the front deployment forwards the request, the replica replays it here and streams the
messages back. When the stream is closed before the app finished (the client went away, so the front
cancelled the call), the app's next `receive` says `http.disconnect` and its task is cancelled: the same
path as a client disconnecting from uvicorn, which aborts the request's sequences.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.types import ASGIApp, Message


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None

    def scope(self) -> dict:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query_string,
            "headers": list(self.headers),
            "client": self.client,
            "server": None,
        }


async def call_app(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[Message]:
    """The response messages of `app` for `request`, as the app sends them."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(request.scope(), receive, send)
        finally:
            messages.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await messages.get()) is not None:
            yield message
        await task  # a bug the app did not answer surfaces here
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
