"""Decode throughput of offloaded compressed experts against the baselines users would pick instead.

For each workload (a preset with the shapes of a large MoE and random weights, or a checkpoint) and each
expert-cache budget and batch size, one run measures four configurations on the same model and KV cache:

  (a) resident     every expert uncompressed on the device (the upper bound; skipped if it does not fit)
  (b) naive        bf16 experts in pinned host memory, LRU slots, synchronous copy on a miss
                   (the pattern of mixtral-offloading and of accelerate's offload)
  (c) compressed   the compressed store (--policy) and the engine's offloading runtime, prefetch off
  (d) +prefetch    the same with prediction of the next MoE layers' experts (--prefetch-depth; default: the
                   depth the cache has room for, offload/lookahead.py)

and reports decode tokens/s, time per output token, time to first token of a --prompt-len prompt, bytes
moved per token, hit rate, prefetch accuracy, wait time, and the physical bound: tokens/s were every
moved byte to go at the link bandwidth measured in the same run (pinned host→device on a GPU; on a CPU
its analogue, a memcpy). Synthetic experts are drawn one at a time straight into each configuration's
memory (never a full bf16 copy on disk). Results: bench/results/<device>.json and a markdown table.

    python bench/throughput.py                      # GPU: mixtral-8x7b and qwen3-30b-a3b, layers that fit
    python bench/throughput.py                      # CPU: the tiny preset and the embedded model
    python bench/throughput.py --preset tiny --presets-only --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

# The throughput_* helpers beside this script (already on the path when it runs as a script). Appended, so
# the other scripts of bench/ (codecs.py, offload.py) never shadow a module of the same name.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from throughput_measure import link_bandwidth  # noqa: E402
from throughput_models import PRESETS, checkpoint_workload, preset_config, synthetic_workload  # noqa: E402
from throughput_report import markdown_table, print_checks  # noqa: E402
from throughput_run import DEVICE_HEADROOM, WARMUP_PROMPT, WorkloadRun, release  # noqa: E402

from moeserve.config import parse_dtype_option  # noqa: E402
from moeserve.errors import MoeServeError  # noqa: E402
from moeserve.models import build_model  # noqa: E402
from moeserve.offload.cache import SlotPool  # noqa: E402
from moeserve.offload.policy import load_policy  # noqa: E402
from moeserve.offload.runtime import parse_budget  # noqa: E402

GPU_PRESETS = ("mixtral-8x7b", "qwen3-30b-a3b")
CPU_PRESETS = ("tiny",)
# eb = 0.1 x mean|w| per tensor: about 5.6 bits/value on weight-like data (bench/README.md, Codecs), an
# error whose RMS is 6% of mean|w|, well inside what arXiv 2509.07727 found harmless in every layer.
DEFAULT_POLICY = '{"default": {"codec": "szp", "mode": "mean_abs", "error_bound": 0.1}}'
RESULTS = Path(__file__).resolve().parent / "results"
HOST_SHARE = 0.7  # of the host's available memory, for the largest copy of the experts (the bf16 one)
GiB = 2**30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help=f"synthetic workload, repeatable (default: {', '.join(GPU_PRESETS)} on a GPU, "
                             f"{', '.join(CPU_PRESETS)} on a CPU)")
    parser.add_argument("--layers", type=int, default=None,
                        help="layers of the presets (default: as many as fit in host and device memory)")
    parser.add_argument("--model", default=None,
                        help="checkpoint directory measured after the presets (default on a CPU: the embedded model)")
    parser.add_argument("--presets-only", action="store_true", help="measure no checkpoint, only the presets")
    parser.add_argument("--dtype", default=None, help="compute dtype of --model (default: the checkpoint's)")
    parser.add_argument("--budgets", default="10%,25%,50%", help="expert-cache budgets, comma-separated")
    parser.add_argument("--batches", default=[1, 8], type=batch_sizes, help="batch sizes, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (capped by a model's context)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed after the first token")
    parser.add_argument("--policy", default=DEFAULT_POLICY,
                        help="error-bound policy of (c) and (d): a YAML/JSON file or text (default: szp, 0.1 x mean|w|)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefetch-depth", type=int, default=None,
                        help="(d): MoE layers to predict ahead (default: as many as the cache has room for)")
    parser.add_argument("--out", default=None, help="results file (default: bench/results/<device>.json)")
    return parser.parse_args(argv)


def batch_sizes(text: str) -> list[int]:
    sizes = sorted({int(b) for b in text.split(",") if b.strip()})
    if not sizes or sizes[0] < 1:
        raise ValueError(text)
    return sizes


def bench_device(args: argparse.Namespace) -> torch.device:
    """--device (default: CUDA when there is one) and --threads, shared by the benchmarks of bench/."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda was given but no CUDA device is available; use --device cpu.")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bench_device(args)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    for budget in budgets:
        parse_budget(budget, GiB)  # a misspelt budget stops here, before minutes of building models
    batches = args.batches
    presets = args.preset or list(GPU_PRESETS if device.type == "cuda" else CPU_PRESETS)
    model_dir = checkpoint_to_measure(args, device)
    policy = load_policy(args.policy)

    # Large enough for the link's steady state, small enough for any machine that runs the presets.
    bandwidth = link_bandwidth(device, GiB if device.type == "cuda" else 256 * 2**20)
    print(f"device {device_name(device)}; {bandwidth_kind(device)}: {bandwidth / 1e9:.1f} GB/s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    results = {
        "device": device_name(device),
        "command": " ".join(["python", "bench/throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_kind": bandwidth_kind(device),
        "policy": policy.to_yaml(),
        "prefetch_depth": args.prefetch_depth,  # None: automatic
        "workloads": [],
    }
    started = time.perf_counter()
    for name in presets:
        layers = args.layers or fitting_layers(name, budgets, device)
        workload = synthetic_workload(name, layers, device, args.seed)
        results["workloads"].append(run_workload(workload, args, budgets, batches, policy, device, bandwidth))
        del workload
        release(device)
    if model_dir is not None:
        workload = checkpoint_workload(model_dir, device, parse_dtype_option(args.dtype))
        results["workloads"].append(run_workload(workload, args, budgets, batches, policy, device, bandwidth))
        del workload
        release(device)
    results["wall_seconds"] = time.perf_counter() - started

    out = Path(args.out) if args.out else RESULTS / f"{slug(device_name(device))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(markdown_table(results))
    print_checks(results)
    print(f"\n{results['wall_seconds']:.0f} s in all; results written to {out}")
    return 0


def run_workload(workload, args, budgets, batches, policy, device, bandwidth) -> dict:
    context = workload.config.max_position_embeddings
    prompt_len = min(args.prompt_len, context - args.new_tokens - 1)
    if prompt_len < WARMUP_PROMPT:
        sys.exit(f"error: {workload.name} has a context of {context} tokens, too short for a prompt and "
                 f"{args.new_tokens} new tokens; lower --new-tokens.")
    c = workload.config
    print(f"\n{workload.name}: {len(c.moe_layer_ids)} MoE layers x {c.num_experts} experts (top-{c.top_k}), "
          f"hidden {c.hidden_size}, expert width {c.moe_intermediate_size}, {c.dtype}; experts "
          f"{workload.num_experts_total * workload.expert_nbytes / GiB:.2f} GiB; prompt {prompt_len}, "
          f"{args.new_tokens} new tokens", flush=True)
    run = WorkloadRun(workload, budgets, batches, prompt_len, args.new_tokens, device, bandwidth, args.seed,
                      args.prefetch_depth)
    return run.run(policy)


def fitting_layers(preset: str, budgets: list[str], device: torch.device) -> int:
    """The most layers of `preset` whose bf16 host copies fit in HOST_SHARE of the available host memory
    and whose largest slot pool fits on the device beside the resident weights."""
    full = preset_config(preset, None)
    expert_bytes = SlotPool.slot_nbytes(full.hidden_size, full.moe_intermediate_size, full.dtype)  # a host row
    # torch's pinned allocator rounds each buffer up to a power of two.
    host_expert = 1 << (expert_bytes - 1).bit_length() if device.type == "cuda" else expert_bytes
    available = host_available_bytes()
    for layers in range(full.num_layers, 0, -1):
        config = preset_config(preset, layers)
        experts = len(config.moe_layer_ids) * config.num_experts
        if experts * host_expert > HOST_SHARE * available:
            continue
        if device.type != "cuda":
            return layers
        pool = max(parse_budget(b, experts * expert_bytes) for b in budgets)
        resident = sum(p.numel() for p in build_model(config).parameters()) * config.dtype.itemsize
        if pool + resident + DEVICE_HEADROOM <= torch.cuda.mem_get_info(device)[0]:
            return layers
    sys.exit(f"error: not one layer of {preset} fits this machine's memory; pick a smaller preset.")


def host_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu {name}"


def bandwidth_kind(device: torch.device) -> str:
    return "pinned host-to-device copy" if device.type == "cuda" else "host memcpy (the CPU analogue of the link)"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def checkpoint_to_measure(args: argparse.Namespace, device: torch.device) -> Path | None:
    """--model, else the embedded model on a CPU (a clear exit if it is not installed), else none."""
    if args.presets_only:
        return None
    if args.model is not None:
        path = Path(args.model).expanduser()
        if not (path / "config.json").is_file():
            sys.exit(f"error: --model {args.model} is not a checkpoint directory (no config.json); pass one.")
        return path
    if device.type == "cuda":
        return None
    from moeserve.assets import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        sys.exit(f"error: the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                 f"pass --model DIR, or --presets-only to measure the synthetic presets alone.")
    return DEFAULT_MODEL_DIR


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MoeServeError as exc:  # a bad budget, policy, dtype or checkpoint: its one sentence, no traceback
        sys.exit(f"error: {exc}")
