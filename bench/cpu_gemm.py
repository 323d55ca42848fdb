"""CPU grouped GEMM (moeserve._cpu_gemm) at decode sizes: GB/s of weights streamed, against torch and memcpy.

    python bench/cpu_gemm.py                 # every shape, float32 and bfloat16, 1 and 2 threads, each CPU path
    python bench/cpu_gemm.py --isa avx2      # one path only (on an AVX-512 machine: the AVX2 path)
    python bench/cpu_gemm.py --pool-mb 128   # a smaller weight pool (faster set-up; more of it cached)

Each call reads weights from a pool of copies larger than the last-level cache, rotating, so they come from
memory as in a decode step (which streams every weight once). GB/s = weight bytes the call reads (each used
slot's [N, K] once) per second, median over rounds in which torch and each path take turns (so a neighbour's
load on a shared machine slows them alike). Against:
  - torch: what the engine ran before the kernel: F.linear for a dense layer; for experts, one F.linear per
    used slot over its rows (the host path);
  - memcpy: torch's copy of a pool-sized buffer, bytes copied per second (each read once and written once:
    about three times that in memory traffic, with the write's line fill), on the same thread count.
Runs in under a minute.
"""

from __future__ import annotations

import os

# Spinning OpenMP workers (the default wait policy) steal the cores being measured on a shared machine;
# this must be set before torch loads libgomp, which the extension shares.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeserve.layers import cpu_gemm


@dataclass(frozen=True)
class Shape:
    name: str
    pairs: int  # activation rows x experts per row
    slots: int  # of those, how many distinct weight matrices (1: a dense layer)
    n: int
    k: int


SHAPES = [
    Shape("dense 1 row 1024x1024", 1, 1, 1024, 1024),
    Shape("dense 4 rows 1024x1024", 4, 1, 1024, 1024),
    Shape("dense 64 rows 1024x1024", 64, 1, 1024, 1024),  # Linear's largest batch (GROUPED_GEMM_MAX_TOKENS)
    Shape("experts 8 pairs gate_up 2x512x1024", 8, 8, 1024, 1024),
    Shape("experts 8 pairs down 1024x512", 8, 8, 1024, 512),
    Shape("lm_head 1 row 16384x1024", 1, 1, 16384, 1024),
]


def timed(fns: dict, seconds: float) -> dict:
    """Per name, the median seconds of one call of fns[name]. The calls take turns (one of each per round,
    for about `seconds` in all after a warm-up), so a neighbour's load on the memory bus hits them alike."""
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    rounds = max(5, min(2000, int(seconds / max(time.perf_counter() - start, 1e-7))))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def run_shape(shape: Shape, dtype: torch.dtype, pool: torch.Tensor, isas: list[str], seconds: float):
    """pool: a flat byte buffer; carved into as many [slots, n, k] weight sets as fit."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    per_set = shape.slots * shape.n * shape.k
    sets = max(1, pool.numel() // (per_set * itemsize))
    weights = pool[: sets * per_set * itemsize].view(dtype).view(sets, shape.slots, shape.n, shape.k)
    rows_per_slot = shape.pairs // shape.slots
    a = torch.randn(rows_per_slot, shape.k).to(dtype)
    rows = torch.arange(rows_per_slot).repeat(shape.slots)  # [P]
    slots = torch.arange(shape.slots).repeat_interleave(rows_per_slot)  # [P]
    turn = [0]

    def next_set() -> torch.Tensor:
        turn[0] = (turn[0] + 1) % sets
        return weights[turn[0]]

    def kernel(isa):
        def call():
            cpu_gemm.set_isa(isa)
            cpu_gemm.cpu_grouped_gemm(a, rows, slots, next_set())

        return call

    def torch_linear():
        w = next_set()
        for s in range(shape.slots):
            F.linear(a, w[s])

    try:
        results = timed({"torch": torch_linear, **{isa: kernel(isa) for isa in isas}}, seconds * (1 + len(isas)))
    finally:
        cpu_gemm.set_isa("auto")
    return per_set * itemsize, results


def memcpy_gbps(pool: torch.Tensor, seconds: float) -> float:
    dst = torch.empty_like(pool)
    return pool.numel() / timed({"copy": lambda: dst.copy_(pool)}, seconds)["copy"] / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isa", action="append", help="a path to time (repeatable); default: every one the CPU has")
    parser.add_argument("--threads", type=int, action="append", help="thread counts (repeatable); default 1 and 2")
    parser.add_argument("--pool-mb", type=int, default=512, help="weight pool size; above the last-level cache")
    parser.add_argument("--seconds", type=float, default=0.25, help="timing per measurement")
    args = parser.parse_args()
    if cpu_gemm.isa() is None:
        raise SystemExit("the CPU GEMM extension is not built: python setup.py build_ext --inplace")
    isas = args.isa or [i for i in ("avx512", "avx2") if i in cpu_gemm.supported_isas()] or ["scalar"]
    threads = args.threads or [1, 2]
    # Bytes 0x3c..0x3f: every float32 and bfloat16 read from them is a normal number in [2**-7, 1) (no denormals,
    # which some FMA units take slow paths for).
    pool = torch.randint(0x3C, 0x40, (args.pool_mb << 20,), dtype=torch.uint8)
    print(f"torch {torch.__version__}, CPU paths {cpu_gemm.supported_isas()}, pool {args.pool_mb} MiB, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    header = f"| shape | dtype | threads | memcpy GB/s | torch GB/s | " + " | ".join(
        f"{isa} GB/s | {isa} / torch" for isa in isas) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    before = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            copy = memcpy_gbps(pool, args.seconds)
            for shape in SHAPES:
                for dtype in (torch.float32, torch.bfloat16):
                    nbytes, times = run_shape(shape, dtype, pool, isas, args.seconds)
                    linear = times["torch"]
                    cells = " | ".join(f"{nbytes / times[i] / 1e9:.1f} | {linear / times[i]:.2f}" for i in isas)
                    print(f"| {shape.name} | {str(dtype).removeprefix('torch.')} | {t} | {copy:.1f} | "
                          f"{nbytes / linear / 1e9:.1f} | {cells} |", flush=True)
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    main()
