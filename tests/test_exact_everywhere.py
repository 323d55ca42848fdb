"""The bit-equality tests hold at any thread count, not only at the one this run happens to use.

Matmul results depend on how many threads split the work, so an equality that holds only because
both sides ran at the same count of this machine is no guarantee. Each run here repeats every test
marked `exact` in a fresh interpreter whose torch starts with another count.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


THREAD_COUNTS = (1, 4)


_started: dict[int, tuple[subprocess.Popen, object, object]] = {}


def start_early() -> None:
    """Start both runs (once). The conftest calls this as soon as collection has found these tests, so the runs
    go on beside the rest of the session: it mostly keeps one core busy (a C++ compile, a single-threaded
    server or subprocess), and they take the other. Output goes to files: a full pipe would stop a run until
    the fixture below read it."""
    for threads in THREAD_COUNTS:
        if threads not in _started:
            stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            process = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-m", "exact", "-p", "no:cacheprovider", str(TESTS)],
                env={**os.environ, "MOESERVE_TEST_THREADS": str(threads)},
                stdout=stdout,
                stderr=stderr,
                text=True,
                cwd=TESTS.parent,
                start_new_session=True,  # a group of its own, which stop_early() ends whole
            )
            _started[threads] = (process, stdout, stderr)


def stop_early() -> None:
    """End runs that no test waited for (a session stopped by -x or ^C); the conftest calls this at the end."""
    for process, _, _ in _started.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # with whatever it started (forked workers, servers)
            process.wait()


@pytest.fixture(scope="module")
def runs() -> dict[int, subprocess.CompletedProcess]:
    """Both runs, side by side: the one at 1 thread leaves a core to the other, and each spends seconds
    importing and collecting on one core, so together they take little more than the longer one."""
    start_early()  # unless the conftest already has
    finished = {}
    for threads, (process, stdout, stderr) in _started.items():
        process.wait()
        stdout.seek(0)
        stderr.seek(0)
        finished[threads] = subprocess.CompletedProcess(process.args, process.returncode, stdout.read(), stderr.read())
    return finished


@pytest.mark.parametrize("threads", THREAD_COUNTS)
def test_exact_tests_hold_at_another_thread_count(runs, threads):
    result = runs[threads]
    assert result.returncode == 0, f"exact tests at {threads} threads:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    assert f"torch threads: {threads}" in result.stdout  # written by the conftest, so the count took effect
    assert " passed" in result.stdout.splitlines()[-1]
