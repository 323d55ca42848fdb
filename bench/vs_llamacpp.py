"""moeserve against llama.cpp: batch-1 CPU decode tokens/s on the same token ids, interleaved, 1 and 2 threads.

llama.cpp runs through llama-cpp-python, a bench-only dependency (nothing in moeserve/ imports it), on GGUF files
that bench/gguf_export.py writes from the same checkpoint directories moeserve loads.

Models (--models, comma-separated):
  embedded         the embedded default model (qwen3_moe, hidden 128, 8 layers, float32 compute) against
                   llama.cpp on an F32 GGUF of it. Target: >= 0.5x llama.cpp at 1 thread.
  mid              a random qwen3_moe of a mid size (hidden 1024, 8 layers, 32 experts top-4, expert width 512,
                   16 query / 4 KV heads of 64; --hidden ... --vocab override the shape), bf16 weights written by
                   transformers' save_pretrained with a fixed seed, built once under --work-dir; moeserve computes
                   in bf16, llama.cpp on a BF16 GGUF. Target: >= 0.9x llama.cpp at 1 and 2 threads.
  mid-offload      the same mid model with moeserve's experts offloaded (policy szp rel 1e-3, expert cache 25%)
                   against llama.cpp BF16 with every weight resident. Target: >= 0.8x llama.cpp.
  default-offload  bench/offload.py's model (the embedded one) offloaded the same way, against the same model
                   resident in moeserve. Target: >= 0.8x resident.

What is timed. Every setting (engine x model x threads) runs in a fresh subprocess per round, so OpenMP teams,
llama.cpp's threadpool and torch's thread count never meet in one process: torch.set_num_threads(n) for
moeserve, n_threads = n_threads_batch = n for llama.cpp, and OMP_NUM_THREADS=n for both. Rounds are interleaved:
round r runs every setting once, the order rotated by r, so a slow phase of the machine spreads over all of them
(--rounds, default 5; medians reported). In each subprocess, after loading and one untimed full generation
(first-call allocations; compilation, where moeserve compiles), a greedy generation of N+1 tokens (--new-tokens
N, default 64; EOS ignored) from a fixed --prompt-len-token prompt is timed whole, and so is the same prompt with
1 new token (the median of 3). Decode time = T(N+1) - T(1): the N decode steps after the prefill's token, each
engine's per-request overhead and its prefill cancelling out; decode tok/s = N / that. moeserve is timed through
its public `LLM.generate` (prefix caching off, so every call prefills in full); llama.cpp through
`Llama.eval` with the next token the argmax of the last row of logits (greedy, llama.cpp's own sampler chain
skipped: a numpy argmax over the vocabulary), the state reset before each generation.

Matched numerics: llama.cpp's KV cache is in the model's dtype (--llama-kv-type model: F32 for the F32 GGUF,
BF16 for the BF16 one; llama.cpp's default is F16) and flash attention is off (llama-cpp-python's default;
on a CPU it rounds Q to F16). Offloaded moeserve runs use the runtime's default decode threads (C++, at least
two; --decode-workers) beside the n torch threads, as `moeserve generate` does.

Tokens: the same prompt ids go to both engines, and each decodes its own greedy continuation. On fp32 they are
the same tokens (checked below); in bf16 and with lossy compressed experts they may part, which leaves the work
per token unchanged but moves routing, and so an expert cache's hit rate. Greedy decoding of the random-weight
mid model soon cycles through a couple of tokens, so the expert cache of mid-offload sees the same few routings
over and over (hit rate near 1): a best case. default-offload, on the trained embedded model, is the realistic one.

Correctness, before any timing: on the fp32 models (the embedded model; --check adds others, exported F32 and
run by moeserve in float32) both engines decode --check-tokens (32) greedy tokens from 3 prompts, llama.cpp with
an F32 KV cache; every token must agree, or the script says the GGUF export is wrong and exits 1. The first
step's logits are compared too (max |diff|).

    python bench/vs_llamacpp.py                                   # every model, threads 1 and 2, 5 rounds
    python bench/vs_llamacpp.py --models mid --hidden 2048 --experts 64 --rounds 3
    python bench/vs_llamacpp.py --check-only                      # the agreement check alone
    python bench/vs_llamacpp.py --moeserve-eager                  # moeserve's eager decode step
    python bench/vs_llamacpp.py --moeserve-option NAME=VALUE      # any other LLM(...) keyword, if it accepts it

Needs llama-cpp-python (CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python) and gguf (pip install gguf).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
INSTALL_LLAMA = ('llama-cpp-python is not installed; install it with CMAKE_ARGS="-DGGML_NATIVE=ON" pip install '
                 'llama-cpp-python (a source build, about 13 minutes) and run this again.')
INSTALL_GGUF = "the gguf package is not installed; install it with pip install gguf and run this again."

OFFLOAD_POLICY = {"default": {"codec": "szp", "mode": "rel", "error_bound": 1e-3}}
MID_SHAPE = dict(hidden=1024, layers=8, experts=32, top_k=4, moe_intermediate=512, heads=16, kv_heads=4,
                 head_dim=64, vocab=768)
MODELS = ("embedded", "mid", "mid-offload", "default-offload")
EXPORT_VERSION = 1  # bump when bench/gguf_export.py changes what it writes: cached GGUFs are rebuilt
PREFILL_REPEATS = 3
CHECK_PROMPTS = 3


@dataclass(frozen=True)
class Setting:
    """One timed configuration: an engine on a prepared model at a thread count."""

    engine: str  # "moeserve" or "llama.cpp"
    variant: str  # "embedded", "mid", "mid-offload", "embedded-offload"
    threads: int

    @property
    def label(self) -> str:
        return f"{self.engine} {self.variant} t{self.threads}"


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--new-tokens", type=int, default=64, help="timed decode tokens N (default 64)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "moeserve" / "vs_llamacpp",
                   help="built models, GGUF files and compressed stores are kept here")
    p.add_argument("--seed", type=int, default=0)
    shape = p.add_argument_group("mid model shape (the defaults are the issue's mid model)")
    for key, value in MID_SHAPE.items():
        shape.add_argument(f"--{key.replace('_', '-')}", type=int, default=value, dest=key)
    shape.add_argument("--shape", default=None, metavar="KEY=N,...",
                       help=f"the same in one argument, keys {', '.join(k.replace('_', '-') for k in MID_SHAPE)} "
                            f"(e.g. --shape hidden=2048,experts=64,top-k=8)")
    p.add_argument("--mid-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="the mid model's weights and both engines' compute dtype (default bfloat16)")
    p.add_argument("--moeserve-eager", action="store_true", help="LLM(enforce_eager=True)")
    p.add_argument("--moeserve-option", action="append", default=[], metavar="NAME=VALUE",
                   help="another LLM(...) keyword (VALUE as JSON, else a string); dropped with a warning if this "
                        "moeserve's LLM does not take it")
    p.add_argument("--expert-cache", default="25%", help="offloaded runs' decoded-expert cache (default 25%%)")
    p.add_argument("--decode-workers", type=int, default=None, help="offloaded runs' decode threads (default: moeserve's)")
    p.add_argument("--llama-kv-type", choices=("model", "f32", "f16", "bf16"), default="model",
                   help="llama.cpp KV cache type for timing (default: the GGUF's weight type)")
    p.add_argument("--llama-flash-attn", action="store_true", help="llama.cpp flash attention on (default off)")
    p.add_argument("--check", default="embedded",
                   help="models whose fp32 greedy tokens must agree (comma-separated; 'none' to skip)")
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--check-only", action="store_true", help="run the agreement check and stop")
    p.add_argument("--out", type=Path, default=None, help="write every run and the summary as JSON here")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for item in filter(None, (args.shape or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in MID_SHAPE or not value.strip().isdigit():
            p.error(f"--shape {item!r}: write KEY=N with KEY one of {', '.join(k.replace('_', '-') for k in MID_SHAPE)}")
        setattr(args, key, int(value))
    args.threads = [int(t) for t in args.threads.split(",")]
    args.check = [] if args.check == "none" else [m.strip() for m in args.check.split(",") if m.strip()]
    for m in args.check:
        if m not in ("embedded", "mid"):
            p.error(f"--check takes embedded and/or mid (the offloaded variants are lossy), not {m!r}")
    if min(args.rounds, args.new_tokens, args.prompt_len, *args.threads) < 1:
        p.error("--rounds, --new-tokens, --prompt-len and --threads must be at least 1")
    return args


def main(argv=None) -> int:
    if str(REPO) not in sys.path:  # moeserve from this checkout, installed or not
        sys.path.insert(0, str(REPO))
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if importlib.util.find_spec("llama_cpp") is None:
        print(INSTALL_LLAMA)
        return 2
    if importlib.util.find_spec("gguf") is None:
        print(INSTALL_GGUF)
        return 2
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    options = moeserve_options(args)
    models = prepare_models(args)
    print(machine_line(), flush=True)

    report = {"date": datetime.date.today().isoformat(), "machine": machine_line(),
              "command": " ".join(["python", "bench/vs_llamacpp.py", *(sys.argv[1:] if argv is None else argv)]),
              "models": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in models.items()},
              "moeserve_options": options, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len}
    if args.check:
        ok, report["check"] = agreement_check(args, models)
        if not ok:
            write_report(args, report)
            return 1
    if args.check_only:
        write_report(args, report)
        return 0

    settings = timed_settings(args)
    runs: dict[Setting, list[dict]] = {s: [] for s in settings}
    print(f"\n{len(settings)} settings x {args.rounds} rounds, each a fresh process; {args.new_tokens} decode tokens "
          f"after a {args.prompt_len}-token prompt", flush=True)
    for r in range(args.rounds):
        shift = r % len(settings)
        for s in settings[shift:] + settings[:shift]:
            result = run_worker(args, timed_spec(args, s, models, options))
            runs[s].append(result)
            extra = f", hit rate {result['hit_rate']:.2f}" if "hit_rate" in result else ""
            print(f"round {r + 1}/{args.rounds}  {s.label:<34} {result['tok_s']:8.1f} tok/s  "
                  f"(prefill {1000 * result['prefill_s']:.0f} ms, {result['distinct_tokens']} distinct tokens{extra})",
                  flush=True)
    rows = summary_rows(args, runs)
    report["runs"] = [{**asdict(s), **run} for s, rs in runs.items() for run in rs]
    report["summary"] = rows
    report["wall_s"] = time.perf_counter() - started
    print()
    print(table(args, runs, rows))
    write_report(args, report)
    return 0


def write_report(args, report: dict) -> None:
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"results written to {args.out}")


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import llama_cpp
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    # what decides the instruction sets each engine runs, when set (an AVX2-only host emulated on a wider one:
    # bench/README.md, "Against llama.cpp")
    chosen = [f"{name}={os.environ[name]}" for name in ("LLAMA_CPP_LIB_PATH", "MOESERVE_CPU_ISA", "ATEN_CPU_CAPABILITY")
              if os.environ.get(name)]
    return (f"{cpu}, {os.cpu_count()} cores visible, load average {load:.1f} at the start; "
            f"llama-cpp-python {llama_cpp.__version__}; Python {platform.python_version()}"
            + (f"; {', '.join(chosen)}" if chosen else ""))


def moeserve_options(args) -> dict:
    """LLM keywords from --moeserve-eager / --moeserve-option that this moeserve's LLM accepts."""
    from moeserve.llm import LLM

    accepted = inspect.signature(LLM.__init__).parameters
    options = {"enforce_eager": True} if args.moeserve_eager else {}
    for item in args.moeserve_option:
        name, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--moeserve-option {item!r}: write NAME=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options[name] = value
    for name in list(options):
        if name not in accepted:
            print(f"warning: this moeserve's LLM takes no {name!r} keyword; running without it")
            del options[name]
        elif name in ("model", "device", "dtype", "policy", "expert_cache", "prefix_caching", "progress"):
            raise SystemExit(f"--moeserve-option {name}: set by the benchmark itself")
    return options


# ---------------------------------------------------------------------------------------------- models


def prepare_models(args) -> dict[str, dict]:
    """Per variant: the checkpoint directory, the GGUF for timing, moeserve's dtype and offload options;
    the compressed stores built once (moeserve caches them under --work-dir)."""
    from moeserve.assets import default_model_dir

    need = set(args.models) | {m for m in args.check}
    models: dict[str, dict] = {}
    if need & {"embedded", "default-offload"}:
        embedded = default_model_dir()
        models["embedded"] = dict(dir=embedded, gguf=gguf_for(args, embedded, "f32"), gguf_type="f32", dtype=None)
        if "default-offload" in need:
            models["embedded-offload"] = dict(dir=embedded, gguf=None, dtype=None, offload=True)
    if need & {"mid", "mid-offload"}:
        mid = build_mid(args)
        gguf_type = "bf16" if args.mid_dtype == "bfloat16" else "f32"
        models["mid"] = dict(dir=mid, gguf=gguf_for(args, mid, gguf_type), gguf_type=gguf_type, dtype=args.mid_dtype)
        if "mid-offload" in need:
            models["mid-offload"] = dict(dir=mid, gguf=None, dtype=args.mid_dtype, offload=True)
    for variant, spec in models.items():
        if spec.get("offload"):  # compress once, outside every timed process
            run_worker(args, dict(kind="prepare", dir=str(spec["dir"]), dtype=spec["dtype"],
                                  expert_cache=args.expert_cache, decode_workers=args.decode_workers), quiet=True)
            print(f"{variant}: compressed store ready (szp rel 1e-3)", flush=True)
    return models


def checkpoint_key(model_dir: Path, *extra) -> str:
    digest = hashlib.sha256(repr(extra).encode())
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".json", ".safetensors"):
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def gguf_for(args, model_dir: Path, gguf_type: str) -> Path:
    key = checkpoint_key(model_dir, gguf_type, EXPORT_VERSION)
    out = args.work_dir / "gguf" / f"{model_dir.name}-{gguf_type}-{key}.gguf"
    if not out.is_file():
        run_worker(args, dict(kind="export", dir=str(model_dir), out=str(out), dtype=gguf_type), quiet=False)
    return out


def mid_config(args) -> dict:
    s = {k: getattr(args, k) for k in MID_SHAPE}
    return dict(
        model_type="qwen3_moe", vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
        num_experts=s["experts"], num_experts_per_tok=s["top_k"], moe_intermediate_size=s["moe_intermediate"],
        # the dense MLP width transformers requires; unused, every layer is sparse (as Qwen3-30B-A3B: 768 x 8)
        intermediate_size=s["moe_intermediate"] * s["top_k"], decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, rope_theta=1e6, max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=False, eos_token_id=1, pad_token_id=0, bos_token_id=None,
    )


def build_mid(args) -> Path:
    fields = mid_config(args)
    key = hashlib.sha256(json.dumps([fields, args.mid_dtype, args.seed], sort_keys=True).encode()).hexdigest()[:12]
    s = {k: getattr(args, k) for k in MID_SHAPE}
    name = (f"qwen3moe-h{s['hidden']}-l{s['layers']}-e{s['experts']}k{s['top_k']}-i{s['moe_intermediate']}"
            f"-{args.mid_dtype}-{key}")
    out = args.work_dir / "models" / name
    if not (out / "config.json").is_file():
        run_worker(args, dict(kind="build", fields=fields, dtype=args.mid_dtype, seed=args.seed, out=str(out)),
                   quiet=False)
    return out


# ------------------------------------------------------------------------------------ the agreement check


def check_prompts(vocab: int, length: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    low = 5 if vocab > 16 else 0  # the embedded model's ids 0-4 are special tokens
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(CHECK_PROMPTS)]


def agreement_check(args, models: dict[str, dict]) -> tuple[bool, list[dict]]:
    results, ok = [], True
    for variant in args.check:
        spec = models[variant]
        gguf = spec["gguf"] if variant == "embedded" else gguf_for(args, spec["dir"], "f32")
        result = run_worker(args, dict(kind="check", dir=str(spec["dir"]), gguf=str(gguf), tokens=args.check_tokens,
                                       prompt_len=args.prompt_len, seed=args.seed, threads=1))
        result["model"] = variant
        results.append(result)
        agree = sum(p["agree"] for p in result["prompts"])
        print(f"\nagreement check, {variant} (fp32 in both engines; llama.cpp F32 GGUF, F32 KV cache): "
              f"{agree}/{len(result['prompts'])} prompts give the same {args.check_tokens} greedy tokens; "
              f"first-step logits max |diff| {result['max_logit_diff']:.2e} (logits up to {result['max_logit']:.1f})")
        for i, p in enumerate(result["prompts"]):
            line = f"  prompt {i}: " + ("same tokens" if p["agree"] else
                                        f"first difference at token {p['first_diff']}: moeserve {p['moeserve'][p['first_diff']]}, "
                                        f"llama.cpp {p['llama'][p['first_diff']]}")
            print(line + f"; moeserve {p['moeserve'][:12]}...")
        if agree != len(result["prompts"]):
            ok = False
            print(f"FAILED: llama.cpp decodes the fp32 GGUF of {variant} to other tokens than moeserve decodes the "
                  f"checkpoint, so the GGUF export (bench/gguf_export.py) is wrong; no timing was run.")
    return ok, results


# -------------------------------------------------------------------------------------- timed settings


def timed_settings(args) -> list[Setting]:
    pairs = []  # (engine, variant) in a fixed order, each once
    for m in args.models:
        if m == "embedded":
            pairs += [("moeserve", "embedded"), ("llama.cpp", "embedded")]
        elif m == "mid":
            pairs += [("moeserve", "mid"), ("llama.cpp", "mid")]
        elif m == "mid-offload":
            pairs += [("moeserve", "mid-offload"), ("llama.cpp", "mid")]
        elif m == "default-offload":
            pairs += [("moeserve", "embedded-offload"), ("moeserve", "embedded")]
    pairs = list(dict.fromkeys(pairs))
    return [Setting(e, v, t) for t in args.threads for e, v in pairs]


def timed_spec(args, s: Setting, models: dict[str, dict], options: dict) -> dict:
    spec = models[s.variant]
    common = dict(kind="time", engine=s.engine, threads=s.threads, new_tokens=args.new_tokens,
                  prompt_len=args.prompt_len, seed=args.seed)
    if s.engine == "llama.cpp":
        kv = args.llama_kv_type
        if kv == "model":
            kv = spec["gguf_type"]
        return dict(common, gguf=str(spec["gguf"]), kv_type=kv, flash_attn=args.llama_flash_attn,
                    vocab=vocab_of(spec["dir"]))
    return dict(common, dir=str(spec["dir"]), dtype=spec["dtype"], offload=bool(spec.get("offload")),
                expert_cache=args.expert_cache, decode_workers=args.decode_workers, options=options,
                vocab=vocab_of(spec["dir"]))


def vocab_of(model_dir: Path) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def summary_rows(args, runs: dict[Setting, list[dict]]) -> list[dict]:
    """Per (model, threads): moeserve's median against its baseline's, and the median of per-round ratios."""
    rows = []
    targets = {"embedded": {1: 0.5}, "mid": {t: 0.9 for t in args.threads},
               "mid-offload": {t: 0.8 for t in args.threads}, "default-offload": {t: 0.8 for t in args.threads}}
    pairs = {"embedded": (("moeserve", "embedded"), ("llama.cpp", "embedded"), "llama.cpp F32"),
             "mid": (("moeserve", "mid"), ("llama.cpp", "mid"), f"llama.cpp {'BF16' if args.mid_dtype == 'bfloat16' else 'F32'}"),
             "mid-offload": (("moeserve", "mid-offload"), ("llama.cpp", "mid"),
                             f"llama.cpp {'BF16' if args.mid_dtype == 'bfloat16' else 'F32'} resident"),
             "default-offload": (("moeserve", "embedded-offload"), ("moeserve", "embedded"), "moeserve resident")}
    for m in args.models:
        ours, theirs, baseline = pairs[m]
        for t in args.threads:
            a, b = runs[Setting(*ours, t)], runs[Setting(*theirs, t)]
            ta, tb = [r["tok_s"] for r in a], [r["tok_s"] for r in b]
            per_round = [x / y for x, y in zip(ta, tb)]
            same = [ra["tokens"] == rb["tokens"] for ra, rb in zip(a, b)]
            target = targets[m].get(t)
            ratio = statistics.median(ta) / statistics.median(tb)
            rows.append(dict(model=m, threads=t, moeserve_tok_s=statistics.median(ta), baseline=baseline,
                             baseline_tok_s=statistics.median(tb), ratio=ratio,
                             ratio_per_round_median=statistics.median(per_round),
                             ratio_min=min(per_round), ratio_max=max(per_round), target=target,
                             met=None if target is None else ratio >= target, same_tokens=all(same),
                             hit_rate=statistics.median(r["hit_rate"] for r in a) if "hit_rate" in a[0] else None))
    return rows


def table(args, runs: dict[Setting, list[dict]], rows: list[dict]) -> str:
    lines = [f"medians of {args.rounds} interleaved rounds; decode tok/s = {args.new_tokens} tokens / "
             f"(T({args.new_tokens + 1} new) - T(1 new)), batch 1, greedy", "",
             "| setting | median tok/s | min | max | prefill ms | distinct tokens |", "|---|---:|---:|---:|---:|---:|"]
    for s, rs in runs.items():
        tok = [r["tok_s"] for r in rs]
        lines.append(f"| {s.label} | {statistics.median(tok):.1f} | {min(tok):.1f} | {max(tok):.1f} | "
                     f"{1000 * statistics.median(r['prefill_s'] for r in rs):.0f} | "
                     f"{statistics.median(r['distinct_tokens'] for r in rs):.0f} of {args.new_tokens + 1} |")
    lines += ["", "| model | threads | moeserve tok/s | baseline | baseline tok/s | ratio | per-round ratios: median "
              "(min-max) | target | met | same tokens |", "|---|---:|---:|---|---:|---:|---|---:|---|---|"]
    for r in rows:
        target = "—" if r["target"] is None else f">= {r['target']:.1f}x"
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        hit = f" (hit rate {r['hit_rate']:.2f})" if r["hit_rate"] is not None else ""
        lines.append(f"| {r['model']} | {r['threads']} | {r['moeserve_tok_s']:.1f}{hit} | {r['baseline']} | "
                     f"{r['baseline_tok_s']:.1f} | **{r['ratio']:.2f}x** | {r['ratio_per_round_median']:.2f} "
                     f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {target} | {met} | "
                     f"{'yes' if r['same_tokens'] else 'no'} |")
    lines += ["", "same tokens: whether both sides of a row generated identical tokens in every round. bf16 rounding "
              "(mid) and the lossy compressed experts (offload rows) may send them apart; the work per token is the "
              "same either way, but routing, and so an expert cache's hit rate, follows the tokens. Greedy decoding "
              "of the random-weight mid model soon cycles through a few tokens (distinct tokens above), which "
              "flatters an expert cache: the offload rows on the trained embedded model are the realistic ones."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- workers


def run_worker(args, spec: dict, quiet: bool = True) -> dict:
    """`spec` in a fresh interpreter; its last line of stdout is 'RESULT <json>'."""
    threads = spec.get("threads")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["MOESERVE_CACHE_DIR"] = str(args.work_dir / "moeserve-cache")
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=str(REPO))
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif not quiet:
            print(line, flush=True)
    if proc.returncode != 0 or result is None:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the {spec['kind']} subprocess ({spec.get('engine', '')} {spec.get('dir', spec.get('gguf', ''))}) "
                         f"failed with exit status {proc.returncode}; its output is above.")
    return result


def worker(spec: dict) -> int:
    kind = spec["kind"]
    if kind == "export":
        sys.path.insert(0, str(BENCH))
        from gguf_export import export_gguf

        export_gguf(spec["dir"], spec["out"], spec["dtype"])
        result = {}
    elif kind == "build":
        result = build_worker(spec)
    elif kind == "prepare":
        llm = load_moeserve(spec, offload=True)
        result = {"store_bytes": llm.offload.store.nbytes}
        llm.offload.provider.close()
    elif kind == "check":
        result = check_worker(spec)
    else:
        result = time_worker(spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def build_worker(spec: dict) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(spec["fields"])
    model_type = fields.pop("model_type")
    dtype = getattr(torch, spec["dtype"])
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(spec["seed"])
    started = time.perf_counter()
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    out = Path(spec["out"])
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    from moeserve.assets import default_model_dir

    embedded = default_model_dir()
    if fields["vocab_size"] == json.loads((embedded / "config.json").read_text())["vocab_size"]:
        for name in ("tokenizer.json", "tokenizer_config.json"):  # the embedded model's tokenizer fits this vocab
            shutil.copy(embedded / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {out} ({params / 1e6:.0f}M parameters, {spec['dtype']}, seed {spec['seed']}) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return {"params": params}


def load_moeserve(spec: dict, offload: bool, options: dict | None = None):
    import torch
    from moeserve import LLM

    kwargs = dict(options or {})
    if offload:
        kwargs.update(policy=OFFLOAD_POLICY, expert_cache=spec["expert_cache"], decode_workers=spec["decode_workers"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # A context just long enough for the runs, and a KV cache to match (the CPU default takes a share of RAM).
    context = json.loads((Path(spec["dir"]) / "config.json").read_text()).get("max_position_embeddings", 4096)
    needed = spec.get("prompt_len", 16) + max(spec.get("new_tokens", 0), spec.get("tokens", 0)) + 16
    return LLM(spec["dir"], device="cpu", dtype=spec.get("dtype"), prefix_caching=False, kv_cache="64MiB",
               max_model_len=min(context, needed), progress=False, **kwargs)


def timing_prompt(vocab: int, length: int, seed: int) -> list[int]:
    return check_prompts(vocab, length, seed + 1000)[0]


class LlamaGreedy:
    """llama.cpp through llama-cpp-python: eval the prompt, then one token at a time, each the argmax of the
    last row of logits."""

    def __init__(self, path: str, threads: int, n_ctx: int, kv_type: str, flash_attn: bool, logits_all: bool = False):
        import llama_cpp

        self.llama_cpp = llama_cpp
        kv = {"f32": 0, "f16": 1, "bf16": 30}[kv_type]  # ggml_type (llama-cpp-python exports no GGML_TYPE_BF16)
        self.llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, type_k=kv, type_v=kv, flash_attn=flash_attn,
                                   logits_all=logits_all, verbose=False, seed=0)
        self.n_vocab = self.llm.n_vocab()

    def logits(self):
        import numpy as np

        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def generate(self, prompt: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        out = [int(self.logits().argmax())]
        while len(out) < n:
            self.llm.eval(out[-1:])
            out.append(int(self.logits().argmax()))
        return out

    def close(self):
        self.llm.close()


def check_worker(spec: dict) -> dict:
    import numpy as np
    from moeserve import SamplingParams

    llm = load_moeserve(dict(spec, dtype="float32"), offload=False)
    vocab = llm.config.vocab_size
    n_ctx = max(256, spec["prompt_len"] + spec["tokens"] + 8)
    llama = LlamaGreedy(spec["gguf"], spec["threads"], n_ctx, "f32", flash_attn=False)
    params = SamplingParams(max_tokens=spec["tokens"], temperature=0.0, ignore_eos=True)
    prompts, max_diff, max_logit = [], 0.0, 0.0
    for prompt in check_prompts(vocab, spec["prompt_len"], spec["seed"]):
        ours = list(llm.generate([prompt], params)[0].token_ids)
        theirs = llama.generate(prompt, spec["tokens"])
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        ms_logits = llm.score(prompt)[-1].numpy()
        llama.generate(prompt, 1)
        ll_logits = llama.logits().copy()
        max_diff = max(max_diff, float(np.abs(ms_logits - ll_logits).max()))
        max_logit = max(max_logit, float(np.abs(ms_logits).max()))
        prompts.append(dict(prompt=prompt, moeserve=ours, llama=theirs, agree=first is None and len(ours) == len(theirs),
                            first_diff=first))
    llama.close()
    return dict(prompts=prompts, max_logit_diff=max_diff, max_logit=max_logit)


def time_worker(spec: dict) -> dict:
    n, threads = spec["new_tokens"], spec["threads"]
    prompt = timing_prompt(spec["vocab"], spec["prompt_len"], spec["seed"])
    result: dict = {}
    if spec["engine"] == "llama.cpp":
        n_ctx = 256 * -(-(spec["prompt_len"] + n + 8) // 256)
        llama = LlamaGreedy(spec["gguf"], threads, n_ctx, spec["kv_type"], spec["flash_attn"])

        def generate(k: int) -> list[int]:
            return llama.generate(prompt, k)

        result["n_threads"] = llama.llm.n_threads
    else:
        import torch
        from moeserve import SamplingParams

        llm = load_moeserve(spec, offload=spec["offload"], options=spec["options"])

        def generate(k: int) -> list[int]:
            params = SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)
            return list(llm.generate([prompt], params)[0].token_ids)

        result["torch_threads"] = torch.get_num_threads()
    generate(n + 1)  # untimed: first-call allocations, compilation
    prefill = []
    for _ in range(PREFILL_REPEATS):
        start = time.perf_counter()
        generate(1)
        prefill.append(time.perf_counter() - start)
    if spec["engine"] == "moeserve" and llm.offload is not None:
        llm.offload.stats.reset()  # the hit rate of the timed generation
    start = time.perf_counter()
    tokens = generate(n + 1)
    total = time.perf_counter() - start
    prefill_s = statistics.median(prefill)
    decode_s = total - prefill_s
    result.update(loadavg_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None, tokens=tokens, total_s=total, prefill_s=prefill_s, decode_s=decode_s, tok_s=n / decode_s,
                  distinct_tokens=len(set(tokens)))
    if spec["engine"] == "moeserve" and llm.offload is not None:
        result["hit_rate"] = llm.offload.stats.hit_rate
        llm.offload.provider.close()
    if spec["engine"] == "llama.cpp":
        llama.close()
    return result


if __name__ == "__main__":
    sys.exit(main())
