"""One replica of a scale-out application: one moeserve engine behind the app `create_app` builds, as in a
single process, serving the requests the front forwards (asgi_call.py).

    front ── forward(ForwardedRequest, prefix_key) ──► Replica: create_app(LLM) ──► ASGI messages back
    Replica ── every SYNC_SECONDS ──► Board: heartbeat, policy job reports, /metrics text
            ◄── published policies ─── (followed by ClusterPolicies)

The engine's step thread starts and stops with the app's lifespan, entered here as uvicorn enters it. When Serve
stops the replica (scale-down, `serve.delete`, SIGTERM to `moeserve serve`) it drains as one process does:
running requests finish for up to the drain timeout, then end with a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import AsyncIterator

from ray import serve

from moeserve.server.app import ServerConfig, create_app
from moeserve.server.asgi_call import ForwardedRequest, call_app
from moeserve.server.ray_board import SYNC_SECONDS
from moeserve.server.ray_policy import ClusterPolicies

logger = logging.getLogger("moeserve.server")


@dataclass(frozen=True)
class ReplicaSpec:
    llm_options: dict  # keyword arguments of moeserve.LLM (paths absolute, policies loaded)
    server: ServerConfig
    torch_threads: int


class Replica:
    async def __init__(self, spec: ReplicaSpec, board):
        import torch

        from moeserve import LLM

        torch.set_num_threads(spec.torch_threads)
        self.board = board
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        llm = await asyncio.to_thread(lambda: LLM(**spec.llm_options, progress=False))
        self.app = create_app(llm, spec.server)
        self.lifespan = contextlib.AsyncExitStack()
        await self.lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        self.policies = ClusterPolicies(self.app, board, self.replica_id)
        await self.policies.catch_up(await board.desired.remote())
        await self._sync()  # listed in /health before the first request reaches it
        self.syncing = asyncio.ensure_future(self._sync_forever())

    async def forward(self, request: ForwardedRequest, prefix_key: str | None = None) -> AsyncIterator[dict]:
        """The app's response messages (`prefix_key` was for the router)."""
        async for message in call_app(self.app, request):
            yield message

    async def _sync(self) -> None:
        metrics = self.app.state.server.metrics.render()
        desired = await self.board.sync.remote(
            self.replica_id, os.getpid(), os.uname().nodename, self.policies.reports(), metrics
        )
        await self.policies.follow(desired)

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_SECONDS)
            try:
                await self._sync()
            except Exception:  # the board restarting, say: this replica keeps serving and retries
                logger.warning("replica %s could not sync with the board", self.replica_id, exc_info=True)

    async def __del__(self):
        """Serve stops this replica: drain (ServerConfig.drain_timeout), then stop the step thread."""
        self.syncing.cancel()
        await self.lifespan.aclose()
