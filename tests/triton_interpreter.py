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


# Every test file with kernel tests for the interpreter: one TRITON_INTERPRET=1 interpreter runs them all (each
# run starts torch and imports triton, seconds on a 2-core machine), and each file's driver test checks its own.
INTERPRETED_FILES = ("test_grouped_gemm.py", "test_paged_attention.py")
_runs: dict[str, subprocess.CompletedProcess] = {}
OUTCOMES = {"PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"}


def _interpreted_run(keyword: str) -> subprocess.CompletedProcess:
    if keyword not in _runs:
        tests = Path(__file__).resolve().parent
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        _runs[keyword] = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", keyword,
             *(str(tests / name) for name in INTERPRETED_FILES)],
            env=env, capture_output=True, text=True, cwd=tests.parent,
        )  # fmt: skip
    return _runs[keyword]


def assert_interpreted_tests_pass(test_file: Path, keyword: str) -> None:
    """Every test of `test_file` selected by `keyword` passes on CPU tensors in Triton's interpreter, none skipped."""
    assert test_file.name in INTERPRETED_FILES, f"add {test_file.name} to INTERPRETED_FILES"
    result = _interpreted_run(keyword)
    report = f"TRITON_INTERPRET=1 run:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
    # -rA: a summary line per test, "PASSED tests/test_x.py::test_y[...]", "SKIPPED [1] tests/test_x.py:12: why", ...
    outcomes = [line.split(" ", 1)[0] for line in result.stdout.splitlines()
                if line.split(" ", 1)[0] in OUTCOMES and f" tests/{test_file.name}" in line]
    assert outcomes and set(outcomes) == {"PASSED"}, report
