"""bench/gpu_check.py without a GPU: its arguments, its one-sentence exit, its stage plumbing (budgets, pytest's
JUnit counts, the test files it picks) and the report it assembles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # last: bench/codecs.py must not shadow anything

import gpu_check  # noqa: E402
from gpu_check_stages import (  # noqa: E402
    DECODE_STEP_ARGV, STAGES, THROUGHPUT_ARGV, StageResult, gpu_test_files, junit_counts, run_child,
)

REPO = Path(__file__).resolve().parents[1]


def test_stages_default_to_all_and_take_a_subset():
    assert gpu_check.parse_args([]).stages == list(STAGES)
    assert gpu_check.parse_args(["--stages", "decode_step, tests"]).stages == ["decode_step", "tests"]
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--stages", "tests,speed"])
    assert exit_info.value.code == 2


def test_the_bench_stages_pass_flags_their_scripts_accept():
    import decode_step
    import throughput

    decode_args = decode_step.parse_args([*DECODE_STEP_ARGV[1:], "--out", "decode.json"])
    assert (decode_args.preset, decode_args.layers, decode_args.batches) == ("mixtral-8x7b", 4, [1, 8])
    throughput_args = throughput.parse_args([*THROUGHPUT_ARGV[1:], "--out", "throughput.json"])
    assert (throughput_args.preset, throughput_args.layers, throughput_args.presets_only) == (["mixtral-8x7b"], 2, True)


def test_budgets_fit_the_eight_minutes():
    assert sum(budget for budget, _ in STAGES.values()) <= 8 * 60 - 30  # start-up and the report besides


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_without_cuda_it_exits_with_one_sentence(tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == gpu_check.NO_CUDA and done.stdout == ""
    assert not list(tmp_path.iterdir())


def test_junit_counts_read_pytests_own_report(tmp_path):
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert False\n"
        "@pytest.mark.skip(reason='x')\n"
        "def test_skip(): pass\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError\n"
        "def test_error(broken): pass\n"
    )
    junit = tmp_path / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                    "test_probe.py"], cwd=tmp_path, capture_output=True, timeout=120)
    counts = junit_counts(junit.read_text())
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 1, 1)
    assert sorted(counts["not_passed"]) == ["test_probe::test_bad", "test_probe::test_error"]


def test_the_tests_stage_picks_the_files_with_gpu_tests():
    names = {p.name for p in gpu_test_files(REPO / "tests")}
    assert {"test_kernels_gpu.py", "test_parity.py", "test_sampler.py"} <= names
    assert "test_gpu_check.py" not in names and "test_generation.py" not in names


def test_a_child_past_its_budget_is_stopped_and_a_failing_one_reported(tmp_path):
    slow, ok = run_child("slow", 1, [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"], tmp_path)
    assert slow.status == "timeout" and not ok and slow.seconds < 20 and "started" in slow.output_tail
    failing, ok = run_child("failing", 30, [sys.executable, "-c", "raise SystemExit('broken')"], tmp_path)
    assert failing.status == "failed" and not ok and "broken" in failing.output_tail
    fine, ok = run_child("fine", 30, [sys.executable, "-c", "print('done')"], tmp_path)
    assert fine.status == "ok" and ok and fine.output_tail == "done\n"


def test_the_report_holds_the_machine_and_every_stage_by_name(tmp_path):
    results = [
        StageResult("tests", "ok", 40.0, 120, "pytest -m gpu", {"passed": 9, "failed": 0}),
        StageResult("codec", "skipped", 0.0, 60, "measure()", output_tail="cupy is not installed"),
        StageResult("decode_step", "timeout", 150.5, 150, "python bench/decode_step.py"),
    ]
    report = gpu_check.assemble(results, {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"})
    assert report["gpu"] == "NVIDIA H100 80GB HBM3" and report["seconds"] == pytest.approx(190.5)
    assert report["not_ok"] == ["decode_step"]
    assert list(report["stages"]) == ["tests", "codec", "decode_step"]
    assert report["stages"]["tests"]["figures"] == {"passed": 9, "failed": 0}
    assert report["stages"]["decode_step"]["budget_s"] == 150
    json.dumps(report)  # serialisable as it stands
    path = gpu_check.output_path(tmp_path, "NVIDIA H100 80GB HBM3")
    assert path == tmp_path / "gpu_check-NVIDIA-H100-80GB-HBM3.json"


def test_missing_wheels_names_what_is_absent(monkeypatch):
    assert gpu_check.missing_wheels() == []  # the test extra installs everything the stages import
    monkeypatch.setitem(gpu_check.NEEDED, "no_such_module_for_gpu_check", "no-such-wheel")
    monkeypatch.setitem(gpu_check.NEEDED, "no_such_package_for_gpu_check.sub", "no-such-package")
    assert gpu_check.missing_wheels() == ["no-such-wheel", "no-such-package"]
