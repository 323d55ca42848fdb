"""The bit-equality tests hold at any thread count, not only at the one this run happens to use.

Matmul results depend on how many threads split the work, so an equality that holds only because
both sides ran at the same count of this machine is no guarantee. Each run here repeats every test
marked `exact` in a fresh interpreter whose torch starts with another count.
"""

from __future__ import annotations

import pytest

from early_runs import TESTS, EarlyRun

THREAD_COUNTS = (1, 4)

# Both runs, side by side: the one at 1 thread leaves a core to the other, and each spends seconds importing and
# collecting on one core, so together they take little more than the longer one.
_RUNS = {threads: EarlyRun(["-m", "exact", str(TESTS)], {"MOESERVE_TEST_THREADS": str(threads)})
         for threads in THREAD_COUNTS}


def start_early() -> None:
    for run in _RUNS.values():
        run.start()


def stop_early() -> None:
    for run in _RUNS.values():
        run.stop()


@pytest.fixture(scope="module")
def runs() -> dict:
    start_early()  # unless the conftest already has
    return {threads: run.result() for threads, run in _RUNS.items()}


@pytest.mark.parametrize("threads", THREAD_COUNTS)
def test_exact_tests_hold_at_another_thread_count(runs, threads):
    result = runs[threads]
    assert result.returncode == 0, f"exact tests at {threads} threads:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    assert f"torch threads: {threads}" in result.stdout  # written by the conftest, so the count took effect
    assert " passed" in result.stdout.splitlines()[-1]
