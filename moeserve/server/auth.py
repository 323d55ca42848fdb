"""Edge guards that run before any route reads the request: the shutdown's drain, API key and body size.

In:  every HTTP request (ASGI scope, receive).
Out: the request passed on unchanged, or a 503 / 401 / 413 with OpenAI's error JSON.

- `DrainMiddleware`: while the server drains for shutdown, every new request gets 503 (/health included,
  so a load balancer stops sending); /metrics still answers, so the drain can be watched.

- `ApiKeyMiddleware`: with --api-key, /v1/* and the tokenizer endpoints need `Authorization: Bearer
  KEY` (compared in constant time); /health and /metrics stay open for probes and scrapers, as in vLLM.
- `BodyLimitMiddleware`: refuses a declared Content-Length over the limit at once, and stops a
  body without one (chunked) as soon as it passes the limit.
"""

from __future__ import annotations

import hmac

from typing import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeserve.server.errors import error_response


_TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


class DrainMiddleware:
    def __init__(self, app: ASGIApp, draining: Callable[[], bool]):
        self.app, self.draining = app, draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.draining() and scope.get("path") != "/metrics":
            response = error_response(503, "the server is shutting down; send the request to another server.")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self._key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        protected = path.startswith("/v1/") or path in _TOKENIZER_PATHS
        if scope["type"] == "http" and protected and scope["method"] != "OPTIONS":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                problem = "is missing" if not header else "is wrong"
                response = error_response(
                    401,
                    f"the API key {problem}; send it as the header 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self._message = f"the request body is larger than {max_bytes} bytes; send a smaller request."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await error_response(413, self._message, code="request_too_large")(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside the route's body read: FastAPI passes HTTPExceptions through to
                    # the app's handler, which answers with the error JSON.
                    raise HTTPException(413, self._message)
            return message

        await self.app(scope, counting_receive, send)
