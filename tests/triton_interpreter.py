"""Triton kernels in the tests: the markers that pick where a kernel test runs, and the run of a test file's
kernel tests in a fresh interpreter under TRITON_INTERPRET=1 (the variable must be set before triton is
imported, so the run that sets it cannot be this one)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(
    not (INTERPRETED and HAS_TRITON), reason="runs in test_triton_interpreter_subprocess's TRITON_INTERPRET=1 run"
)
requires_cuda_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON and not INTERPRETED), reason="needs a CUDA device and triton"
)


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
