"""The `moeserve` command line: one subcommand per job, each a thin layer over the Python API.

A user error (`MoeServeError`, or a mistake in the arguments) prints one line, `error: ...`, and
exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moeserve.errors import MoeServeError


def _add_model_options(parser: argparse.ArgumentParser, policy_variants: bool = False, offload: bool = True,
                       default_dtype: str | None = None) -> None:
    parser.add_argument("--model", default=None, help="Hugging Face checkpoint directory (default: the embedded model)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--dtype", default=default_dtype,
        help=f"bfloat16, float16 or float32 (default: {default_dtype or 'the checkpoint' + chr(39) + 's'})",
    )
    if not offload:
        return
    if policy_variants:
        parser.add_argument(
            "--policy", action="append", default=[], metavar="[NAME=]FILE",
            help="error-bound policy YAML; NAME=FILE (repeatable) also serves it as the model MODEL@NAME",
        )
    else:
        parser.add_argument("--policy", default=None, help="per-layer error-bound policy YAML: keep experts compressed")
    parser.add_argument("--expert-cache", default=None, help="decoded-expert budget: '25%%', '512MiB' or bytes")
    parser.add_argument("--eviction", default="lfu", choices=["lfu", "lru"])
    parser.add_argument("--no-prefetch", action="store_true", help="load experts only when a layer asks for them")
    parser.add_argument("--enforce-eager", action="store_true", help="run decode steps eagerly: never from CUDA graphs (GPU) or compiled (CPU)")
    parser.add_argument(
        "--prefetch-depth", type=_prefetch_depth, default=None, metavar="N",
        help="MoE layers ahead to predict and load experts for "
             "(default: on a GPU as many as the expert cache has room for; on a CPU none, as guesses cost more than they save there)",
    )


def _add_memory_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-cache", default=None,
        help="KV cache size: bytes ('4GiB') or a share of device memory ('30%%'); default: what remains of "
             "--gpu-memory-utilization on a GPU, a quarter of RAM on a CPU",
    )
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9,
        help="share of the GPU's memory the whole memory plan may take (default 0.9)",
    )
    parser.add_argument(
        "--no-prefix-caching", action="store_true",
        help="compute every prompt in full instead of reusing the KV of prefixes seen before",
    )


def _prefetch_depth(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of MoE layers; give e.g. 2")
    return int(value)


def _llm_options(args: argparse.Namespace, **overrides) -> dict:
    """The LLM arguments the model options describe; `overrides` replace or add some (serve passes the
    policy it split off its variants, and its engine limits)."""
    options = dict(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        policy=args.policy,
        expert_cache=args.expert_cache,
        eviction=args.eviction,
        prefetch=not args.no_prefetch,
        enforce_eager=True if args.enforce_eager else None,  # None: MOESERVE_ENFORCE_EAGER decides
        prefetch_depth=args.prefetch_depth,
        kv_cache=args.kv_cache,
        gpu_memory_utilization=args.gpu_memory_utilization,
        prefix_caching=not args.no_prefix_caching,
    )
    return {**options, **overrides}


def _load_llm(args: argparse.Namespace, **overrides):
    """The LLM the model options describe (see `_llm_options`)."""
    from moeserve import LLM

    return LLM(**_llm_options(args, **overrides))


def _load_llm_to_run(args: argparse.Namespace, **overrides):
    """`_load_llm` for the commands that run the model: offloaded on a CPU, the decode workers get their
    cores from torch (this process runs one model; OMP_NUM_THREADS overrides)."""
    from moeserve.offload.filler import leave_cores_for_decoding

    llm = _load_llm(args, **overrides)
    if llm.offload is not None and llm.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        leave_cores_for_decoding(llm.offload_options.workers)
    return llm


def _cmd_generate(args: argparse.Namespace) -> int:
    from moeserve import SamplingParams

    llm = _load_llm_to_run(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or [],
    )
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        (out,) = llm.chat([messages], params)
    else:
        (out,) = llm.generate([args.prompt], params)
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason}))
    else:
        print(out.text)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from moeserve.eval.evaluate import evaluate

    llm = _load_llm_to_run(args)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    report = evaluate(llm, split=args.split, tasks=tasks, limit=args.limit, progress=not args.json)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    return 0


def _split_list(value: str | None, convert=str, option: str = "") -> tuple | None:
    if value is None:
        return None
    try:
        return tuple(convert(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise MoeServeError(f"{option} {value!r} is not a comma-separated list of numbers; write e.g. 1e-4,1e-3,1e-2.") from None


def _cmd_bench(args: argparse.Namespace) -> int:
    from moeserve import LLM
    from moeserve.eval.bench import BenchOptions, run_bench

    given = {
        "codecs": _split_list(args.codecs),
        "modes": _split_list(args.modes),
        "error_bounds": _split_list(args.error_bounds, float, "--error-bounds"),
        "layers": _split_list(args.layers),
        "experts": args.experts,
        "simulate": args.simulate,
        "tasks": _split_list(args.tasks),
        "limit": args.limit,
        "split": args.split,
        "quality_items": args.quality_items,
    }
    # Options left out keep BenchOptions' defaults.
    options = BenchOptions(**{k: v for k, v in given.items() if v is not None})
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, progress=not args.quiet)
    rows = run_bench(llm, options, Path(args.out), progress=not args.quiet)
    print(f"wrote {len(rows)} rows to {Path(args.out) / 'results.json'}, report.md and plots in {args.out}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from moeserve import LLM
    from moeserve.eval.tune import Tuner, TuneOptions, budget_warnings, policy_yaml

    options = TuneOptions(
        max_accuracy_drop=args.max_accuracy_drop,
        metric=args.metric,
        codec=args.codec,
        mode=args.mode,
        ladder=_split_list(args.ladder, float, "--ladder") or TuneOptions.ladder,
        tasks=_split_list(args.tasks),
        calibration_limit=args.calibration_limit,
        heldout_limit=args.heldout_limit,
    )
    out = Path(args.out)
    if out.parent and not out.parent.is_dir():
        raise MoeServeError(f"--out {out}: the directory {out.parent} does not exist; create it first.")
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, progress=not args.quiet)
    result = Tuner(llm, options, progress=not args.quiet).run()
    text = policy_yaml(result, llm.model_dir.name)
    try:
        out.write_text(text)
    except OSError as exc:
        raise MoeServeError(f"--out {out} cannot be written ({exc.strerror}); choose a writable path.") from None
    warnings = budget_warnings(result)
    summary = [line[2:] for line in text.splitlines() if line.startswith("# ") and not line.startswith("# WARNING: ")]
    print("".join(line + "\n" for line in summary), end="")
    print(f"wrote {out}")
    for warning in warnings:  # also in the YAML's header
        print(f"warning: {warning}", file=sys.stderr)
    return 1 if warnings and args.strict else 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from moeserve.offload.runtime import write_compressed_dir

    # Offloaded even without --policy or --expert-cache: the store then takes the default policy (raw;
    # mxfp4 for an MXFP4 checkpoint) instead of there being no store to write.
    llm = _load_llm(args, expert_cache=args.expert_cache if args.expert_cache is not None else "100%")
    out = Path(args.out)
    write_compressed_dir(llm.offload, llm.model, llm.loaded.checkpoint, llm.model_dir, out)
    store = llm.offload.store
    print(f"wrote {out}: {len(store.experts)} experts, {store.nbytes / 2**20:.1f} MiB compressed")
    return 0


def _cmd_policy_show(args: argparse.Namespace) -> int:
    from moeserve import LLM
    from moeserve.offload.report import format_policy_table

    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, policy=args.policy_file,
              kv_cache=args.kv_cache, gpu_memory_utilization=args.gpu_memory_utilization, progress=False)
    print(format_policy_table(llm.offload))
    print(llm.memory_plan.line())
    print(llm.config.describe_kv_cache())
    return 0


def _check_listen_address(host: str, port: int) -> None:
    """Before the model loads: a port out of range, or one already taken, is a one-line error rather
    than a traceback (or a failure after a long load)."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise MoeServeError(f"--port {port} is out of range; choose a port between 1 and 65535.")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise MoeServeError(f"--host {host!r} is not an address of this machine; use e.g. 127.0.0.1 or 0.0.0.0.") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MoeServeError(
                    f"port {port} on {host} is already in use; stop the program listening there or choose another --port."
                ) from None
            raise MoeServeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --host or --port.") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    from moeserve.server.app import serve
    from moeserve.server.scale_out_cli import scale_out_options

    scale = scale_out_options(args)
    _check_listen_address(args.host, args.port)
    engine_options, config = _serve_options(args)
    if scale is not None:
        from moeserve.server.scale_out_cli import serve_scaled_out

        serve_scaled_out(_llm_options(args, **engine_options), config, scale, args.host, args.port)
        return 0
    llm = _load_llm_to_run(args, **engine_options)
    serve(llm, config, host=args.host, port=args.port)
    return 0


def _serve_options(args: argparse.Namespace):
    """`serve`'s LLM overrides (the base policy, engine limits) and its ServerConfig."""
    from moeserve.server.app import ServerConfig

    base, named = _split_policies(args.policy)
    base_name = None
    if base is None and named:
        base_name, base = next(iter(named.items()))  # MODEL serves the first named policy
    config = ServerConfig(
        model_name=args.served_model_name,
        policies=named,
        base_policy_name=base_name,
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        max_body_bytes=args.max_body_bytes,
        drain_timeout=args.drain_timeout,
    )
    return dict(policy=base, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens), config


def ray_application(args: dict):
    """The scale-out application as a Ray Serve application builder, for deployments that Serve itself starts
    (`serve run`, `serve deploy`, a KubeRay RayService): `moeserve.cli:ray_application` with the arguments of
    `moeserve serve` as one string, e.g.
    `serve run moeserve.cli:ray_application argv="--replicas 2 --policy lossy=/etc/moeserve/lossy.yaml"`.
    The cluster, host and port are Serve's to choose here: --ray-address, --host and --port are ignored."""
    import shlex

    from moeserve.server.ray_launch import application
    from moeserve.server.scale_out_cli import application_specs, scale_out_options

    parsed = build_parser().parse_args(["serve", *shlex.split(str(args.get("argv", "")))])
    scale = scale_out_options(parsed)
    if scale is None:
        raise MoeServeError("the application needs --replicas N (or --max-replicas N) in argv.")
    engine_options, config = _serve_options(parsed)
    return application(*application_specs(_llm_options(parsed, **engine_options), config, scale), scale)


def _split_policies(values: list[str]) -> tuple[str | None, dict[str, str]]:
    """`--policy FILE` (at most once) and `--policy NAME=FILE` (any number, distinct names)."""
    import re

    base, named = None, {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            if name in named:
                raise MoeServeError(f"--policy {name}=... is given twice; give each variant name once.")
            named[name] = path
        elif base is None:
            base = value
        else:
            raise MoeServeError("--policy FILE without a name is given twice; name the variants as --policy NAME=FILE.")
    return base, named


class _Parser(argparse.ArgumentParser):
    """A mistake on the command line is one `error:` line, like every other user error (argparse
    would print the usage first); `--help` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moeserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate a completion for one prompt")
    _add_model_options(gen)
    _add_memory_options(gen)
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--json", action="store_true", help="print token ids, text and finish reason as JSON")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(run=_cmd_generate)

    ev = commands.add_parser("eval", help="exact-match accuracy on the task suite")
    _add_model_options(ev)
    _add_memory_options(ev)
    ev.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ev.add_argument("--tasks", default=None, help="comma-separated skills (default: all)")
    ev.add_argument("--limit", type=int, default=None, help="items per skill")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(run=_cmd_eval)

    bench = commands.add_parser("bench", help="accuracy and quality versus error bound per codec and layer group")
    _add_model_options(bench, offload=False, default_dtype="float32")
    bench.add_argument("--codecs", default=None, help="comma-separated (default: szp,int8,int4); any of szp,sz3,zfp,int8,int4,mxfp4,raw")
    bench.add_argument("--modes", default=None, help="bound modes, comma-separated (default: rel); any of rel,abs,mean_abs")
    bench.add_argument("--error-bounds", default=None, help="comma-separated (default: 1e-4,1e-3,3e-3,1e-2,3e-2,1e-1)")
    bench.add_argument("--layers", default=None, help="layer groups (default: all,shallow,middle,deep); also ids and ranges: 5, 0-3")
    bench.add_argument("--experts", default=None, help="all (default) or most-used:K (usage counted on the validation split)")
    bench.add_argument("--simulate", default=None, choices=["gaussian"], help="also run N(0, eb) noise, the study's stand-in")
    bench.add_argument("--tasks", default=None, help="comma-separated skills (default: all)")
    bench.add_argument("--limit", type=int, default=None, help="items per skill (default: the whole split)")
    bench.add_argument("--split", default="test", choices=["validation", "test"])
    bench.add_argument("--quality-items", type=int, default=None, help="held-out chats per skill for KL / perplexity (default 20)")
    bench.add_argument("--out", required=True, help="output directory (results.json, report.md, plots); reruns resume")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(run=_cmd_bench)

    tune = commands.add_parser("tune", help="write a per-layer policy YAML that meets an accuracy budget")
    _add_model_options(tune, offload=False, default_dtype="float32")
    tune.add_argument("--max-accuracy-drop", type=float, default=0.01, help="fraction: 0.01 is one point (default)")
    tune.add_argument("--metric", default="accuracy", choices=["accuracy", "kl"], help="per-layer sensitivity measure")
    tune.add_argument("--codec", default="szp", help="bounded codec of the policy: szp (default), sz3 or zfp")
    tune.add_argument("--mode", default="rel", help="bound mode: rel (default), abs or mean_abs")
    tune.add_argument("--ladder", default=None, help="error bounds to choose from (default: 1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1)")
    tune.add_argument("--tasks", default=None, help="comma-separated skills (default: all)")
    tune.add_argument("--calibration-limit", type=int, default=None, help="validation items per skill (default: all 50)")
    tune.add_argument("--heldout-limit", type=int, default=None, help="test items per skill (default: all 200)")
    tune.add_argument("--out", required=True, help="policy YAML to write")
    tune.add_argument("--quiet", action="store_true", help="no progress output")
    tune.add_argument(
        "--strict", action="store_true", help="exit 1 when the held-out check warns that the budget is not kept"
    )
    tune.set_defaults(run=_cmd_tune)

    comp = commands.add_parser("compress", help="write the compressed expert store and resident weights to a directory")
    _add_model_options(comp)
    _add_memory_options(comp)
    comp.add_argument("--out", required=True, help="output directory; serve it with --model OUT")
    comp.set_defaults(run=_cmd_compress)

    srv = commands.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics, policy API)")
    _add_model_options(srv, policy_variants=True)
    _add_memory_options(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--api-key", default=os.environ.get("MOESERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* and the tokenizer endpoints (default: $MOESERVE_API_KEY)",
    )
    srv.add_argument("--served-model-name", default=None, help="model name in the API (default: the directory's name)")
    srv.add_argument("--max-model-len", type=int, default=None, help="context in tokens (default: the model's)")
    srv.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (running limit)")
    srv.add_argument(
        "--max-num-batched-tokens", type=int, default=2048,
        help="prompt tokens a step carries besides the running sequences' next tokens; longer prompts prefill "
             "in chunks of this many (default 2048)",
    )
    srv.add_argument("--max-waiting", type=int, default=256, help="sequences queued beyond the running ones (then 429)")
    srv.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body accepted (413 beyond)")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish running requests on shutdown")
    from moeserve.server.scale_out_cli import add_scale_out_options

    add_scale_out_options(srv)
    srv.set_defaults(run=_cmd_serve)

    pol = commands.add_parser("policy", help="inspect error-bound policies")
    pol_commands = pol.add_subparsers(dest="policy_command", required=True)
    show = pol_commands.add_parser("show", help="print the resolved per-layer policy with bits/value and bytes")
    _add_model_options(show, offload=False)  # the policy is the positional file; the table ignores cache options
    _add_memory_options(show)  # for the memory plan it prints
    show.add_argument("policy_file", metavar="POLICY.yaml")
    show.set_defaults(run=_cmd_policy_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MoeServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
