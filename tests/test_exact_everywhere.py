"""The bit-equality tests hold at any thread count, not only at the one this run happens to use.

Matmul results depend on how many threads split the work, so an equality that holds only because
both sides ran at the same count of this machine is no guarantee. Each run here repeats every test
marked `exact` in a fresh interpreter whose torch starts with another count.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


THREAD_COUNTS = (1, 4)


@pytest.fixture(scope="module")
def runs() -> dict[int, subprocess.CompletedProcess]:
    """Both runs, started together: the one at 1 thread leaves a core to the other, and each spends seconds
    importing and collecting on one core, so side by side they take little more than the longer one."""
    started = {
        threads: subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-m", "exact", "-p", "no:cacheprovider", str(TESTS)],
            env={**os.environ, "MOESERVE_TEST_THREADS": str(threads)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=TESTS.parent,
        )
        for threads in THREAD_COUNTS
    }
    finished = {}
    for threads, process in started.items():
        stdout, stderr = process.communicate()
        finished[threads] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return finished


@pytest.mark.parametrize("threads", THREAD_COUNTS)
def test_exact_tests_hold_at_another_thread_count(runs, threads):
    result = runs[threads]
    assert result.returncode == 0, f"exact tests at {threads} threads:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    assert f"torch threads: {threads}" in result.stdout  # written by the conftest, so the count took effect
    assert " passed" in result.stdout.splitlines()[-1]
