"""The stages of bench/gpu_check.py: each runs in a time budget and returns a `StageResult`.

In:  a stage name, a scratch directory, the repository root.
Out: `StageResult`: status (ok / failed / timeout / skipped), seconds, budget, the command, its figures and
     the tail of its output.

The tests, decode-step and throughput stages are child processes killed at their budget (so a hang or a
slow first compile costs that stage only, and each starts with the GPU's memory free); the codec stage
runs in this process on fixed-size tensors.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

TAIL_CHARS = 3000  # of a stage's output kept in the report


@dataclass
class StageResult:
    name: str
    status: str  # "ok", "failed", "timeout" or "skipped"
    seconds: float
    budget_s: int
    command: str
    figures: dict = field(default_factory=dict)
    output_tail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def run_stage(name: str, scratch: Path, repo: Path) -> StageResult:
    budget, stage = STAGES[name]
    return stage(name, budget, scratch, repo)


def run_child(name: str, budget: int, argv: list[str], repo: Path) -> tuple[StageResult, bool]:
    """Run `argv` in `repo` for at most `budget` seconds; (result without figures, whether it exited 0)."""
    command = " ".join(argv)
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as expired:
        output = _text(expired.stdout) + _text(expired.stderr)
        return StageResult(name, "timeout", time.perf_counter() - start, budget, command,
                           output_tail=output[-TAIL_CHARS:]), False
    output = done.stdout + done.stderr
    status = "ok" if done.returncode == 0 else "failed"
    return StageResult(name, status, time.perf_counter() - start, budget, command,
                       output_tail=output[-TAIL_CHARS:]), done.returncode == 0


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def tests_stage(name: str, budget: int, scratch: Path, repo: Path) -> StageResult:
    files = gpu_test_files(repo / "tests")
    junit = scratch / "gpu_tests.xml"
    argv = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}",
            *[str(f.relative_to(repo)) for f in files]]
    result, _ = run_child(name, budget, argv, repo)
    if junit.is_file():
        result.figures = junit_counts(junit.read_text())
        if result.status == "ok" and result.figures["passed"] == 0:
            result.status = "failed"  # every GPU test skipped on a GPU machine means something is missing
    return result


def gpu_test_files(tests: Path) -> list[Path]:
    """The test modules that hold GPU tests; the others are not even imported (their dependencies may be absent)."""
    return sorted(p for p in tests.glob("test_*.py") if "pytest.mark.gpu" in p.read_text())


def junit_counts(xml_text: str) -> dict:
    """pytest's JUnit XML → passed / failed / errors / skipped counts and the ids of the tests that did not pass."""
    root = ElementTree.fromstring(xml_text)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "not_passed": []}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["not_passed"].append(test_id)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["not_passed"].append(test_id)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def codec_stage(name: str, budget: int, scratch: Path, repo: Path) -> StageResult:
    """szp encode and decode speed on the GPU (bench/codecs.py's `measure`), next to the CPU decode."""
    command = "bench/codecs.py measure(): szp, bf16 4096x14336 and 2048x768, alpha 0.1 and 1.0, 3 repeats"
    codecs = _bench_codecs(repo)
    if not codecs.gpu_available():
        return StageResult(name, "skipped", 0.0, budget, command, output_tail="cupy is not installed")
    import torch

    start = time.perf_counter()
    rows = []
    for shape in ((4096, 14336), (2048, 768)):
        x = codecs.synthetic(shape, torch.bfloat16)
        for alpha in (0.1, 1.0):
            r = codecs.measure(x, "szp", alpha, repeat=3, gpu=True)  # asserts GPU decode == CPU decode
            rows.append({
                "shape": list(shape), "dtype": "bfloat16", "alpha": alpha, "bits_per_value": r.bits,
                "max_err_over_eb": r.max_err_over_eb, "gpu_encode_gb_per_s": r.raw_bytes / r.gpu_encode_s / 1e9,
                "gpu_decode_gb_per_s": r.raw_bytes / r.gpu_decode_s / 1e9, "cpu_decode_gb_per_s": r.raw_bytes / r.decode_s / 1e9,
            })
            if time.perf_counter() - start > budget:
                return StageResult(name, "timeout", time.perf_counter() - start, budget, command, {"rows": rows})
    return StageResult(name, "ok", time.perf_counter() - start, budget, command, {"rows": rows})


def _bench_codecs(repo: Path):
    """bench/codecs.py as a module named bench_codecs (as `codecs` it would shadow the standard library's)."""
    if "bench_codecs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_codecs", repo / "bench" / "codecs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_codecs"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_codecs"]


def json_stage(name: str, budget: int, argv: list[str], out: Path, repo: Path) -> StageResult:
    """A bench script that writes its results as JSON to `out`: those results are the stage's figures."""
    import json

    result, ok = run_child(name, budget, [sys.executable, *argv, "--out", str(out)], repo)
    if ok and out.is_file():
        result.figures = json.loads(out.read_text())
    elif ok:
        result.status = "failed"
    return result


DECODE_STEP_ARGV = ["bench/decode_step.py", "--device", "cuda", "--preset", "mixtral-8x7b", "--layers", "4",
                    "--batches", "1,8", "--prompt-len", "64", "--steps", "32", "--profile-steps", "3"]
THROUGHPUT_ARGV = ["bench/throughput.py", "--device", "cuda", "--preset", "mixtral-8x7b", "--layers", "2",
                   "--presets-only", "--budgets", "25%", "--batches", "1", "--prompt-len", "64", "--new-tokens", "16"]


def decode_step_stage(name: str, budget: int, scratch: Path, repo: Path) -> StageResult:
    return json_stage(name, budget, DECODE_STEP_ARGV, scratch / "decode_step.json", repo)


def throughput_stage(name: str, budget: int, scratch: Path, repo: Path) -> StageResult:
    return json_stage(name, budget, THROUGHPUT_ARGV, scratch / "throughput.json", repo)


# name → (budget in seconds on an H100, stage); 450 s in all, inside the 8 minutes with start-up to spare.
STAGES = {
    "tests": (120, tests_stage),
    "codec": (60, codec_stage),
    "decode_step": (150, decode_step_stage),
    "throughput": (120, throughput_stage),
}
