"""Codec benchmark: bits/value, max error / bound, encode and decode GB/s of every codec at several bounds,
on synthetic weight-like tensors and on the experts of a checkpoint. One run prints one table and writes
it to the "## Codecs" section of bench/README.md.

    python bench/codecs.py                  # 4096x14336 and 2048x768, float32 and bfloat16 (a few minutes)
    python bench/codecs.py --quick          # smaller tensors, fewer repeats (about a minute)
    python bench/codecs.py --model DIR      # experts of another HF checkpoint (default: the embedded model)

Bounds are eb = alpha x mean|w| of each tensor (mode mean_abs, the convention of arXiv 2509.07727).
GB/s counts the tensor's own bytes (input for encode, output for decode); times are the best of --repeat
after one warm-up decode. GPU columns (szp kernels via cupy) appear when a CUDA device and cupy are present;
the GPU decode is timed with CUDA events on a device-resident payload.
"""

from __future__ import annotations

import os

# Spinning OpenMP workers (the default wait policy) steal the cores being measured on a shared machine;
# this must be set before torch loads libgomp, which szp's extension shares.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeserve.codecs import decode_into, encode
from moeserve.codecs.szp_cpu import cpu_module

BOUNDED = ("szp", "sz3", "zfp")
BASELINES = ("raw", "int8", "int4")
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "moeserve" / "assets" / "default_model"
README = Path(__file__).resolve().parent / "README.md"
EXPERT_KEY = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def synthetic(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian weights (sigma 0.02) with 0.1% heavy-tailed outliers (Student-t, 2 dof, scale 0.05, |w| <= 1)."""
    rng = np.random.default_rng(seed)
    n = shape[0] * shape[1]
    x = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    idx = rng.choice(n, n // 1000, replace=False)
    x[idx] = np.clip(rng.standard_t(2, idx.size) * 0.05, -1, 1)
    return torch.from_numpy(x).reshape(shape).to(dtype)


def expert_tensors(model: Path, limit: int) -> list[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    tensors = []
    for file in sorted(model.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if EXPERT_KEY.search(key) and len(tensors) < limit:
                    tensors.append((key, f.get_tensor(key)))
    return tensors


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cuda_time(fn, repeat: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def gpu_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Result:
    """Totals over the tensors of one table row."""

    values: int = 0
    raw_bytes: int = 0
    blob_bytes: int = 0
    max_err_over_eb: float | None = None  # None for codecs without a bound
    max_err_over_mean: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0
    gpu_encode_s: float = 0.0
    gpu_decode_s: float = 0.0

    def add(self, other: Result) -> None:
        for name in ("values", "raw_bytes", "blob_bytes", "encode_s", "decode_s", "gpu_encode_s", "gpu_decode_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.max_err_over_eb is not None:
            self.max_err_over_eb = max(self.max_err_over_eb or 0.0, other.max_err_over_eb)
        self.max_err_over_mean = max(self.max_err_over_mean, other.max_err_over_mean)

    @property
    def bits(self) -> float:
        return 8 * self.blob_bytes / self.values


def measure(x: torch.Tensor, codec: str, alpha: float | None, repeat: int, gpu: bool) -> Result:
    kwargs = dict(mode="mean_abs", error_bound=alpha) if alpha is not None else {}
    blob = None

    def run_encode():
        nonlocal blob
        blob = encode(x, codec=codec, **kwargs)

    encode_s = best_time(run_encode, repeat)
    out = torch.empty_like(x)
    decode_into(blob, out)  # warm-up
    decode_s = best_time(lambda: decode_into(blob, out), repeat)
    err = (out.double() - x.double()).abs().max().item()
    mean_abs = x.double().abs().mean().item()
    result = Result(
        values=x.numel(),
        raw_bytes=x.numel() * x.element_size(),
        blob_bytes=blob.nbytes,
        max_err_over_eb=None if blob.abs_bound is None else err / blob.abs_bound if blob.abs_bound else 0.0,
        max_err_over_mean=err / mean_abs,
        encode_s=encode_s,
        decode_s=decode_s,
    )
    if gpu and codec == "szp":
        x_cuda = x.cuda()
        result.gpu_encode_s = best_time(lambda: encode(x_cuda, codec=codec, **kwargs), repeat)
        on_device = blob.with_payload(blob.payload_tensor().cuda())
        out_cuda = torch.empty_like(x_cuda)
        decode_into(on_device, out_cuda)  # warm-up: compiles the kernels once
        result.gpu_decode_s = cuda_time(lambda: decode_into(on_device, out_cuda), max(repeat, 10))
        assert torch.equal(out_cuda.cpu(), out), "GPU and CPU decoders disagree"
    return result


def pysz_decompress_s(x: torch.Tensor, alpha: float, repeat: int) -> float:
    """pysz's own decompress time (no moeserve wrapper) for a float32 tensor at eb = alpha x mean|w|."""
    from pysz import sz, szConfig, szErrorBoundMode

    values = x.float().numpy()
    config = szConfig()
    config.errorBoundMode = szErrorBoundMode.ABS
    config.absErrorBound = alpha * float(np.abs(values, dtype=np.float64).mean())
    compressed, _ = sz.compress(values, config)
    sz.decompress(compressed, np.float32, values.shape)
    return best_time(lambda: sz.decompress(compressed, np.float32, values.shape), repeat)


def gbs(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}" if seconds > 0 else "—"


def tensor_groups(args) -> tuple[list[tuple[str, list[torch.Tensor]]], str]:
    """(label, tensors) per table group, and a note when the checkpoint has no experts to add."""
    shapes = [(1024, 3584), (2048, 768)] if args.quick else [(4096, 14336), (2048, 768)]
    groups = []
    for rows, cols in shapes:
        for name in args.dtypes.split(","):
            groups.append((f"synthetic {rows}x{cols} {name}", [synthetic((rows, cols), getattr(torch, name))]))
    model = Path(args.model)
    experts = expert_tensors(model, args.max_experts) if model.is_dir() else []
    if not experts:
        return groups, f"No expert tensors (`*.experts.N.*_proj.weight`) in `{model}`, so the model part has no rows."
    dtype = str(experts[0][1].dtype).removeprefix("torch.")
    groups.append((f"{model.name} experts ({len(experts)} tensors, {dtype})", [t for _, t in experts]))
    return groups, ""


def table(groups, args, gpu: bool, cpu) -> tuple[list[str], list[str]]:
    """Rows of the main table and of the szp-vs-pysz decode table."""
    head = "| tensors | codec | eb / mean\\|w\\| | bits/value | vs sz3 | max err / eb | max err / mean\\|w\\| |"
    head += " CPU enc GB/s | CPU dec GB/s |" + (" GPU enc GB/s | GPU dec GB/s |" if gpu else "")
    rows, speed_rows = [head, "|---" * (11 if gpu else 9) + "|"], []
    for label, tensors in groups:
        print(f"# {label}", file=sys.stderr)
        for alpha in [float(a) for a in args.bounds.split(",")] + [None]:
            results: dict[str, Result] = {}
            for codec in BOUNDED if alpha is not None else BASELINES:
                results[codec] = Result()
                for x in tensors:
                    results[codec].add(measure(x, codec, alpha, args.repeat, gpu))
                print(f"  {codec} alpha={alpha}: {results[codec].bits:.3f} bits", file=sys.stderr)
            for codec, r in results.items():
                vs = f"{r.bits / results['sz3'].bits - 1:+.0%}" if "sz3" in results and codec != "sz3" else ""
                err_eb = "—" if r.max_err_over_eb is None else f"{r.max_err_over_eb:.4f}"
                row = (
                    f"| {label} | {codec} | {alpha if alpha is not None else '—'} | {r.bits:.3f} | {vs} | "
                    f"{err_eb} | {r.max_err_over_mean:.4f} | {gbs(r.raw_bytes, r.encode_s)} | "
                    f"{gbs(r.raw_bytes, r.decode_s)} |"
                )
                if gpu:
                    row += f" {gbs(r.raw_bytes, r.gpu_encode_s)} | {gbs(r.raw_bytes, r.gpu_decode_s)} |"
                rows.append(row)
            if alpha is not None and tensors[0].dtype == torch.float32:
                speed_rows.append(decode_speed_row(label, tensors, alpha, results["szp"], args.repeat, cpu))
    return rows, speed_rows


def run(args) -> str:
    gpu, cpu = gpu_available(), cpu_module()
    groups, model_note = tensor_groups(args)
    rows, speed_rows = table(groups, args, gpu, cpu)
    threads = cpu.openmp_threads()
    command = " ".join(["python bench/codecs.py", *sys.argv[1:]])
    gpu_name = torch.cuda.get_device_name() if gpu else "none (no GPU columns)"
    lines = [
        "## Codecs",
        "",
        f"Measured {datetime.date.today()} with `{command}`.",
        f"CPU: {cpu_name()}, {os.cpu_count()} cores visible, szp on {threads} OpenMP threads "
        f"(OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}); pysz and zfpy are single-threaded. GPU: {gpu_name}. "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "eb = alpha x mean|w| per tensor. bits/value counts the whole blob (header included). max err is taken in "
        "float64 against the original tensor in its own dtype. GB/s = uncompressed bytes of the tensor per second, "
        f"best of {args.repeat}.",
        "",
        *rows,
        "",
        "szp CPU decode against pysz's own `sz.decompress` (no moeserve wrapper), float32 tensors, same run:",
        "",
        f"| tensors | eb / mean\\|w\\| | szp GB/s ({threads} threads) | szp GB/s (1 thread) | pysz GB/s | szp / pysz |",
        "|---|---|---|---|---|---|",
        *speed_rows,
    ]
    if model_note:
        lines += ["", model_note]
    return "\n".join(lines) + "\n"


def decode_speed_row(label, tensors, alpha, szp: Result, repeat, cpu) -> str:
    threads = cpu.openmp_threads()
    cpu.set_openmp_threads(1)
    single = Result()
    for x in tensors:
        single.add(measure(x, "szp", alpha, repeat, gpu=False))
    cpu.set_openmp_threads(threads)
    pysz_s = sum(pysz_decompress_s(x, alpha, repeat) for x in tensors)
    return (
        f"| {label} | {alpha} | {gbs(szp.raw_bytes, szp.decode_s)} | {gbs(single.raw_bytes, single.decode_s)} | "
        f"{gbs(szp.raw_bytes, pysz_s)} | {pysz_s / szp.decode_s:.1f}x |"
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_section(section: str) -> None:
    """Replaces the "## Codecs" section of bench/README.md (up to the next "## " heading), or appends it."""
    text = README.read_text() if README.exists() else "# Benchmarks\n\n"
    start = text.find("## Codecs")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end < 0 else text[end:])
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024x3584 and 2048x768, 2 repeats")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="HF checkpoint directory with expert tensors")
    parser.add_argument("--max-experts", type=int, default=48, help="expert tensors read from --model")
    parser.add_argument("--bounds", default="0.03,0.1,0.3,1.0", help="alphas: eb = alpha x mean|w|")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the synthetic tensors")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (default 3, quick 2)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    args.repeat = args.repeat or (2 if args.quick else 3)
    torch.manual_seed(0)
    section = run(args)
    print(section)
    if not args.no_write:
        write_section(section)


if __name__ == "__main__":
    main()
