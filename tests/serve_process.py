"""`ServeProcess`: the real `moeserve serve` command in its own process, on a free local port.

For tests that need what only a separate process shows (its resident memory, a client in another
interpreter such as lm-eval, the documented shell examples), rather than an in-process app.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moeserve_command() -> list[str]:
    """The installed `moeserve` script of this interpreter's environment."""
    script = Path(sys.executable).parent / "moeserve"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "moeserve.cli"]


class ServeProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [*moeserve_command(), "serve", "--port", str(self.port), *args]
        self._env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self._log_path = log
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> ServeProcess:
        self._log = open(self._log_path, "w") if self._log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(self._command, env=self._env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moeserve serve exited with status {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("moeserve serve did not answer /health in time")
            time.sleep(0.2)

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line in /proc/PID/status")

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_path:
            self._log.close()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
