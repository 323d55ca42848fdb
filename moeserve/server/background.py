"""`BackgroundServer`: run an app with uvicorn on a free local port in a daemon thread.

For tests and benchmarks that talk to a real server through a real HTTP client in one process.
`stop()` does what SIGTERM does to `moeserve serve` (shutdown.py): the engine drains while new requests
get 503, then uvicorn stops accepting and runs the app's shutdown.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from moeserve.server.shutdown import FLUSH_SECONDS, DrainingServer


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1"):
        """`app`: from create_app (its engine and drain timeout are the server's)."""
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=FLUSH_SECONDS, access_log=False
        )
        state = app.state.server
        self.server = DrainingServer(config, state.engine, state.config.drain_timeout)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
