"""The front of a scale-out application: the Ray Serve ingress every HTTP request enters.

    client ─► Serve proxy ─► Front ── /health, /metrics: from the Board
                                  └─ anything else: read the body, key it for prefix affinity (optional),
                                     forward it to a replica (Serve's router picks one) and relay the
                                     replica's response messages as they come

The replicas run the single-process app, so every route, error and stream is the one-process one. The
front adds what only it can see, a replica dying under a request:
- before the response went out, the client gets a 503 with the error JSON (OpenAI's clients retry it);
- during a stream, an error event and `data: [DONE]`, as when a drain cuts a stream.
A JSON response is held here until it is complete, so it is never cut in half. A client that disconnects
cancels the forwarded call; the replica's app sees the disconnect and aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from moeserve.server.asgi_call import ForwardedRequest
from moeserve.server.errors import ApiError, error_event, error_response
from moeserve.server.metrics import CONTENT_TYPE
from moeserve.server.metrics_merge import merge_replica_metrics
from moeserve.server.routing_key import request_prefix_key
from moeserve.server.streaming import DONE, unless_disconnected

logger = logging.getLogger("moeserve.server")
_REPLICA_LOST = "the replica serving this request stopped before it finished; send the request again."


@dataclass(frozen=True)
class FrontSpec:
    model: str | None  # for the tokenizer, with prefix affinity
    prefix_blocks: int | None  # None: Serve's default routing
    max_body_bytes: int


@serve.ingress()
class Front:
    """The deployment; its ASGI app is a FrontApp."""

    def __init__(self, replicas, board, spec: FrontSpec):
        self.front_app = FrontApp(replicas, board, spec)

    def __serve_build_asgi_app__(self):
        return self.front_app


class FrontApp:
    def __init__(self, replicas, board, spec: FrontSpec):
        self.replicas, self.board, self.spec = replicas.options(stream=True), board, spec
        self.tokenizer = None
        if spec.prefix_blocks is not None:
            from moeserve.loader import resolve_model_dir
            from moeserve.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(resolve_model_dir(spec.model))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # nothing to start or stop
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health" and scope["method"] == "GET":
            await (await self._health())(scope, receive, send)
        elif scope["path"] == "/metrics" and scope["method"] == "GET":
            texts = await self.board.metrics.remote()
            await Response(merge_replica_metrics(texts), media_type=CONTENT_TYPE)(scope, receive, send)
        else:
            await self._forward(scope, receive, send)

    async def _health(self) -> Response:
        """200 with the live replicas (id, pid, node) while at least one serves; else 503."""
        replicas = await self.board.live.remote()
        if not replicas:
            return error_response(503, "no replica of this application is serving yet; retry in a few seconds.")
        return JSONResponse({"status": "ok", "replicas": replicas})

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body(scope, receive)
        if body is None:
            message = f"the request body is larger than {self.spec.max_body_bytes} bytes; send a smaller request."
            await error_response(413, message, code="request_too_large")(scope, receive, send)
            return
        request = ForwardedRequest(
            scope["method"], scope["path"], scope["query_string"], list(scope["headers"]), body, scope.get("client")
        )
        key = None
        if self.tokenizer is not None and scope["method"] == "POST":
            key = await asyncio.to_thread(request_prefix_key, scope["path"], body, self.tokenizer, self.spec.prefix_blocks)
        await unless_disconnected(receive, self._relay(request, key, scope, receive, send))

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body; None past the limit. A declared Content-Length over the limit is left to the
        replica's check (the same 413), which answers without the body."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.spec.max_body_bytes:
            return b""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.spec.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _relay(self, request: ForwardedRequest, key: str | None, scope: Scope, receive: Receive, send: Send):
        stream = self.replicas.forward.remote(request, prefix_key=key)
        start: dict | None = None
        held: list[dict] = []  # a JSON response's messages, sent once complete
        streaming = sent = False
        try:
            async for message in stream:
                if message["type"] == "http.response.start":
                    start = message
                    streaming = _is_event_stream(message)
                    continue
                if not streaming:
                    held.append(message)
                    continue
                if not sent:
                    await send(start)
                    sent = True
                await send(message)
            if not streaming and start is not None:
                await send(start)
                for message in held:
                    await send(message)
        except (RayActorError, ActorUnavailableError):
            logger.warning("a replica stopped during %s %s", request.method, request.path)
            await self._cut(sent, scope, receive, send)
        except RayError:
            logger.exception("forwarding %s %s failed", request.method, request.path)
            await self._cut(sent, scope, receive, send, status=500)
        except asyncio.CancelledError:
            stream.cancel()  # the client went away: the replica's app aborts the request
            raise

    @staticmethod
    async def _cut(sent: bool, scope: Scope, receive: Receive, send: Send, status: int = 503) -> None:
        message = _REPLICA_LOST if status == 503 else "internal server error; the server log has the details."
        if not sent:
            await error_response(status, message)(scope, receive, send)
            return
        await send({"type": "http.response.body", "body": error_event(ApiError(status, message)) + DONE})


def _is_event_stream(start: dict) -> bool:
    headers = {k.lower(): v for k, v in start.get("headers", [])}
    return headers.get(b"content-type", b"").startswith(b"text/event-stream")

