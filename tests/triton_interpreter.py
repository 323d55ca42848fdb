"""Runs a test file's Triton-kernel tests in a fresh interpreter under TRITON_INTERPRET=1 (the variable must be
set before triton is imported, so the run that sets it cannot be this one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def assert_interpreted_tests_pass(test_file: Path, keyword: str) -> None:
    """Every test of `test_file` selected by `keyword` passes on CPU tensors in Triton's interpreter, none skipped."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", keyword, str(test_file)],
        env=env, capture_output=True, text=True, cwd=test_file.parent.parent,
    )
    assert result.returncode == 0, f"TRITON_INTERPRET=1 run:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    last = result.stdout.splitlines()[-1]
    assert " passed" in last and "skipped" not in last, last
