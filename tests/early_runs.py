"""Test runs in subprocesses that start as soon as collection ends and go on beside the rest of the session.

A module that needs one defines `start_early()` and `stop_early()`; the conftest calls them at collection's end
and at the session's end. The session mostly keeps one core busy (a C++ compile, a single-threaded server or
subprocess), so a run started early costs little wall time where started in its test it would add all of its
own. Output goes to files: a full pipe would stop a run until its test read it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).parent
IN_EARLY_RUN_ENV = "MOESERVE_IN_EARLY_RUN"  # set in every early run's environment


class EarlyRun:
    """`python -m pytest -q -p no:cacheprovider *args` from the repository root with `env` added to the environment."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.args, self.env = args, env
        self._process: subprocess.Popen | None = None
        self._files = None

    def start(self) -> None:
        """Start it (once)."""
        if self._process is not None:
            return
        self._files = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *self.args],
            # passive: threads of a run that waits sleep instead of spinning, taking no core from the session's
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", IN_EARLY_RUN_ENV: "1", **self.env},
            stdout=self._files[0],
            stderr=self._files[1],
            text=True,
            cwd=TESTS.parent,
            start_new_session=True,  # a group of its own, which stop() ends whole
        )

    def result(self) -> subprocess.CompletedProcess:
        """Its outcome, starting it first if nothing has, waiting for it to end."""
        self.start()
        self._process.wait()
        stdout, stderr = self._files
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(self._process.args, self._process.returncode, stdout.read(), stderr.read())

    def stop(self) -> None:
        """End it if no test waited for it (a session stopped by -x or ^C), with whatever it started."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
