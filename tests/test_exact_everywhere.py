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


@pytest.mark.parametrize("threads", [1, 4])
def test_exact_tests_hold_at_another_thread_count(threads):
    env = {**os.environ, "MOESERVE_TEST_THREADS": str(threads)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "exact", "-p", "no:cacheprovider", str(TESTS)],
        env=env,
        capture_output=True,
        text=True,
        cwd=TESTS.parent,
    )
    assert result.returncode == 0, f"exact tests at {threads} threads:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    assert f"torch threads: {threads}" in result.stdout  # written by the conftest, so the count took effect
    assert " passed" in result.stdout.splitlines()[-1]

