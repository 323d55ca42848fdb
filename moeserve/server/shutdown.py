"""SIGINT / SIGTERM: drain while the port stays open, then let uvicorn close it.

uvicorn's own shutdown closes the listening socket at once and then waits for open connections, so a
client arriving during the drain got "connection refused" rather than a 503, and responses still running
when its graceful timeout ended were cancelled: a stream broke off with no final event and logged a
CancelledError traceback. `DrainingServer` first runs the engine's drain (AsyncEngine.drain: every new
request gets 503, running ones finish, and after `drain_timeout` seconds those left end with a 503, a
stream with an error event and [DONE]), and only then lets uvicorn shut down, which finds every response
written. What is left to it is writing their last bytes: FLUSH_SECONDS.

uvicorn re-raises the signal it caught once it has shut down, so the process died of SIGTERM (status 143)
even after a clean drain. The first signal is taken here without being recorded, so the process exits 0;
a second one is uvicorn's as before (a second SIGINT forces the exit at once).
"""

from __future__ import annotations

import asyncio
from types import FrameType

import uvicorn

from moeserve.server.async_engine import AsyncEngine

FLUSH_SECONDS = 5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float):
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout
        self._drained = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            super().handle_exit(sig, frame)
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.should_exit and not self._drained:
            self._drained = True
            drain = asyncio.ensure_future(self.engine.drain(self.drain_timeout))
            while not drain.done() and not self.force_exit:
                await asyncio.sleep(0.05)
        return await super().on_tick(counter)
