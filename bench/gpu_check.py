"""One command for a GPU machine: the GPU tests, the szp GPU codec speed, the decode-step benchmark and a short
bench/throughput.py run, each in its own time budget, written as one JSON per GPU model.

    python bench/gpu_check.py --out bench/results/            # about 7 minutes on an H100 at most
    python bench/gpu_check.py --out bench/results/ --stages tests,decode_step

In:  a CUDA device; this repository, installed (`pip install --no-build-isolation --no-deps -e .` builds the
     szp CPU extension the codec stages compare against).
Out: <out>/gpu_check-<GPU model>.json: the machine (GPU, torch, CUDA, cupy), and per stage its status
     (ok / failed / timeout / skipped), seconds, budget and figures: test counts and failures; szp GPU
     encode and decode GB/s; bench/decode_step.py's rows (ms per step, fraction of the bandwidth bound,
     launches and host syncs per step); bench/throughput.py's rows. A stage past its budget is stopped
     and recorded as a timeout; the others still run.

Stages (budget on an H100; the configurations are short on purpose):
  tests        120 s  pytest -m gpu over the test files that hold GPU tests
  codec         60 s  szp on 4096x14336 and 2048x768 bf16 weight-like tensors, eb = 0.1 and 1.0 x mean|w|
  decode_step  150 s  bench/decode_step.py, mixtral-8x7b, 4 layers resident, batch 1 and 8, greedy and sampled
  throughput   120 s  bench/throughput.py, mixtral-8x7b, 2 layers, budget 25%, batch 1, 16 new tokens

Wheels. Where only torch, cupy, numpy, safetensors, tokenizers, pyyaml, jinja2, tqdm and prometheus-client are
installed (and torch's own dependencies: typing-extensions, filelock, fsspec, sympy, setuptools, ...), these
stages import, beyond them:
  pydantic, pydantic-core, annotated-types, typing-inspection    moeserve's configuration and policy types
  pysz, zfpy                                                     codecs that `moeserve.codecs` registers
  pybind11                                                       to build moeserve's szp CPU extension
  pytest, pluggy, iniconfig, packaging, pygments                 the tests stage
  transformers and its dependencies (huggingface-hub, regex, typer, click, hf-xet, httpx, ...)
                                                                 the GPU tests' tiny checkpoints
(fastapi, starlette, uvicorn and matplotlib, also moeserve dependencies, are not imported by any stage.)
triton, which runs the MoE blocks' grouped expert GEMM, comes with torch's CUDA wheels; without it the blocks
fall back to the PyTorch reference, correct but slow (the decode_step figures would say so).
Carry them from a machine with PyPI access as wheels for the GPU machine's Python (54 MB with their dependencies,
34 MB once the wheels of what is already installed there, numpy, tokenizers, safetensors, pyyaml, tqdm,
typing-extensions, filelock and fsspec, are deleted), then install offline:
    pip download -d wheels --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \\
        pydantic pysz zfpy pybind11 pytest transformers
    # on the GPU machine, wheels/ beside the repository:
    pip install --no-index --find-links wheels pydantic pysz zfpy pybind11 pytest transformers
    pip install --no-build-isolation --no-deps -e . && python bench/gpu_check.py --out bench/results/
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from gpu_check_stages import STAGES, StageResult, run_stage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = ("error: bench/gpu_check.py measures a CUDA GPU and torch sees none here "
           "(torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU and a CUDA build of torch.")
# Module → the wheel that provides it, for the one-sentence message when something is not installed.
NEEDED = {"pydantic": "pydantic", "pysz": "pysz", "zfpy": "zfpy", "pytest": "pytest", "transformers": "transformers",
          "moeserve._szp_cpu": "moeserve itself (pip install --no-build-isolation --no-deps -e .)"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="directory for the JSON")
    parser.add_argument("--stages", default=",".join(STAGES), type=stage_list,
                        help=f"comma-separated subset of {', '.join(STAGES)} (default: all)")
    return parser.parse_args(argv)


def stage_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage {unknown[0] if unknown else text!r}; "
                                         f"choose from {', '.join(STAGES)}")
    return names


def missing_wheels() -> list[str]:
    return [wheel for module, wheel in NEEDED.items() if not _importable(module)]


def _importable(module: str) -> bool:
    try:  # a submodule's spec imports its package, which fails when the package's own imports do
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit(NO_CUDA)
    missing = missing_wheels()
    if missing:
        sys.exit(f"error: bench/gpu_check.py needs {', '.join(missing)}, not installed here; install them "
                 f"(this script's docstring shows how to carry the wheels to an offline machine).")
    gpu = torch.cuda.get_device_name()
    print(f"gpu_check on {gpu}: stages {', '.join(args.stages)}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.stages:
            result = run_stage(name, Path(scratch), REPO)
            print(f"  {name:<12} {result.status:<8} {result.seconds:6.1f} s of {result.budget_s} s", flush=True)
            results.append(result)
    report = assemble(results, machine(torch, gpu))
    path = output_path(Path(args.out), gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"written to {path}")
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


def machine(torch, gpu: str) -> dict:
    try:
        import cupy

        cupy_version = cupy.__version__
    except ImportError:
        cupy_version = None
    return {
        "gpu": gpu, "gpu_count": torch.cuda.device_count(),
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cupy": cupy_version,
        "python": platform.python_version(), "commit": git_commit(),
    }


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def assemble(results: list[StageResult], machine_info: dict) -> dict:
    """The report: the machine, then each stage's result by name, and the stages that did not pass."""
    return {
        **machine_info,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": sum(r.seconds for r in results),
        "not_ok": [r.name for r in results if r.status not in ("ok", "skipped")],
        "stages": {r.name: r.as_dict() for r in results},
    }


def output_path(out_dir: Path, gpu: str) -> Path:
    """One file per GPU model: 'NVIDIA H100 80GB HBM3' → gpu_check-NVIDIA-H100-80GB-HBM3.json."""
    slug = "-".join("".join(c if c.isalnum() or c == "." else " " for c in gpu).split())
    return out_dir / f"gpu_check-{slug}.json"


if __name__ == "__main__":
    sys.exit(main())
