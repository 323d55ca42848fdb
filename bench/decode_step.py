"""Decode-step benchmark: time per step against the memory-bandwidth bound, launches and host syncs per step.

For a preset of bench/throughput_models.py (random weights with a real model's shapes, --layers of them),
every expert resident on the device, and each batch size (--batches, default 1,8), one engine decodes
greedy, then sampled (temperature 1, a seed per sequence), and reports per decode step:

  ms per step, tokens/s      median wall time of `LLMEngine.step()` over --steps steps (device synchronized)
  weight bytes read          every resident weight except the embedding table (of which B rows are read),
                             plus the experts the step's tokens route to, counted on the routers
  KV bytes read              keys and values of every cached position of every sequence, every layer
  bound                      those bytes at the copy bandwidth measured in the same run (reads + writes of
                             a large device-to-device copy on a GPU, of a host memcpy on a CPU)
  fraction of the bound      bound ms / measured ms
  launches per step          torch.profiler: CUDA kernels on a GPU; on a CPU the ATen ops the step calls (not their callees)
  host syncs per step        GPU: cudaStreamSynchronize / cudaMemcpy / ... calls; CPU: n/a

Before the timed passes, an untimed greedy pass warms the step's shape buckets (batch bucket, span: see
kv/context.py) with prompts 5 tokens shorter, so the first timed pass decodes lengths never seen before
within buckets already seen: the state of a server that has run a while. The greedy pass then runs again
over the same lengths; `first/repeat` is the ratio of the two, the cost of meeting new lengths.

On a GPU, decode steps replay CUDA graphs (engine/decode_graphs.py) unless --enforce-eager.

    python bench/decode_step.py                                   # GPU: mixtral-8x7b, 4 layers; CPU: tiny
    python bench/decode_step.py --device cpu --preset tiny --threads 1 --out bench/results/decode_step_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from decode_step_profile import CPU_SYNCS_NA, copy_bandwidth, count_per_step  # noqa: E402
from throughput import batch_sizes, bench_device, device_name  # noqa: E402
from throughput_measure import synchronize  # noqa: E402
from throughput_models import PRESETS, synthetic_workload  # noqa: E402

from moeserve.engine.llm_engine import LLMEngine  # noqa: E402
from moeserve.engine.sampling_params import SamplingParams  # noqa: E402
from moeserve.experts import DenseExpertProvider, stack_experts  # noqa: E402
from moeserve.layers.moe import MoeBlock  # noqa: E402

MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0)}
WARM_PROMPT_SHIFT = 5  # the warm-up pass's prompts are this much shorter: the timed passes meet new lengths
WARMUP_STEPS = 2  # of each timed pass, after its prefill: first-use allocations of the pass's batch
GiB = 2**30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="synthetic workload (default: mixtral-8x7b on a GPU, tiny on a CPU)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the preset, every expert resident")
    parser.add_argument("--batches", default=[1, 8], type=batch_sizes, help="batch sizes, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens of every sequence")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per batch and mode")
    parser.add_argument("--profile-steps", type=int, default=3, help="decode steps counted by the profiler")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.layers, args.steps, args.profile_steps) < 1:
        parser.error("--layers, --steps and --profile-steps must be at least 1")
    if args.prompt_len <= WARM_PROMPT_SHIFT:
        parser.error(f"--prompt-len must be above {WARM_PROMPT_SHIFT} (the warm-up pass's prompts are that much shorter)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bench_device(args)
    preset = args.preset or ("mixtral-8x7b" if device.type == "cuda" else "tiny")
    started = time.perf_counter()
    bandwidth = copy_bandwidth(device, GiB if device.type == "cuda" else 256 * 2**20)
    workload = synthetic_workload(preset, args.layers, device, args.seed)
    c = workload.config
    provider = DenseExpertProvider.from_stacked({
        layer: stack_experts(weights, c.num_experts, c.moe_intermediate_size, c.hidden_size, device, c.dtype)
        for layer, weights in workload.experts()
    })  # the layout the loader gives resident experts on a GPU
    print(f"{preset}: {c.num_layers} layers, {c.num_experts} experts top-{c.top_k}, hidden {c.hidden_size}, "
          f"{c.dtype}, every expert resident (stacked) on {device}; prompt {args.prompt_len}, {args.steps} timed steps; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    bench = DecodeBench(workload, provider, device, bandwidth, args)
    rows = [row for batch in args.batches for row in bench.batch_rows(batch)]
    results = {
        "device": device_name(device),
        "command": " ".join(["python", "bench/decode_step.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda_graphs": bench.engine.runner.graphs is not None,
        "cpu_threads": torch.get_num_threads(),
        "preset": preset, "layers": c.num_layers, "dtype": str(c.dtype).removeprefix("torch."),
        "prompt_len": args.prompt_len, "steps": args.steps, "profile_steps": args.profile_steps,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "copy_bandwidth_kind": "device-to-device copy" if device.type == "cuda" else "host memcpy",
        "host_syncs_note": None if device.type == "cuda" else CPU_SYNCS_NA,
        "rows": rows,
        "wall_seconds": time.perf_counter() - started,
    }
    print()
    print(table(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"results written to {out}")
    return 0


class DecodeBench:
    """One engine and its resident experts; `batch_rows` measures one batch size, greedy then sampled."""

    def __init__(self, workload, provider: DenseExpertProvider, device: torch.device, bandwidth: float, args):
        self.config, self.model, self.provider = workload.config, workload.model, provider
        self.device, self.bandwidth, self.args = device, bandwidth, args
        self.expert_nbytes = workload.expert_nbytes
        self.census_steps = 2  # steps whose routing is counted (hooks on the routers sync, so never timed)
        self.steps_per_pass = WARMUP_STEPS + args.steps + args.profile_steps + self.census_steps
        self.engine = LLMEngine(
            workload.model, None, device, max_model_len=args.prompt_len + self.steps_per_pass + 2,
            max_num_seqs=max(args.batches), max_num_batched_tokens=max(args.batches) * args.prompt_len,
            enforce_eager=args.enforce_eager,
        )
        generator = torch.Generator().manual_seed(args.seed)
        self.prompts = {
            b: torch.randint(self.config.vocab_size, (b, args.prompt_len), generator=generator).tolist()
            for b in args.batches
        }

    def batch_rows(self, batch: int) -> list[dict]:
        self._pass(batch, "greedy", shift=WARM_PROMPT_SHIFT)  # warms the shape buckets of the timed passes
        first = self._pass(batch, "greedy")
        repeat = self._pass(batch, "greedy")
        first["first_over_repeat"] = first["ms_per_step"] / repeat["ms_per_step"]
        repeat["mode"] = "greedy-repeat"
        return [first, repeat, self._pass(batch, "sampled")]

    def _pass(self, batch: int, mode: str, shift: int = 0) -> dict:
        args, engine = self.args, self.engine
        params = [
            SamplingParams(max_tokens=1 + self.steps_per_pass, ignore_eos=True, seed=args.seed + i, **MODES[mode])
            for i in range(batch)
        ]
        seqs = [engine.make_sequence(p[shift:], sp) for p, sp in zip(self.prompts[batch], params)]
        for seq in seqs:
            engine.submit(seq, self.provider)
        engine.step()  # prefill
        self._steps(WARMUP_STEPS)
        seconds = statistics.median(self._timed_step() for _ in range(args.steps))
        counts = count_per_step(lambda: self._steps(args.profile_steps), args.profile_steps, self.device)
        experts_per_layer = self._routing_census(self.census_steps)
        if engine.has_unfinished():
            raise RuntimeError("the pass did not finish in its planned steps")
        # Tokens in the cache at each timed step, its new one included: prompt + first token + warm-up.
        context = args.prompt_len + 1 + WARMUP_STEPS + (args.steps - 1) / 2
        weight_bytes = self._resident_bytes_read(batch) + experts_per_layer * len(self.config.moe_layer_ids) * self.expert_nbytes
        kv_bytes = self._kv_bytes_per_token() * batch * context
        bound_s = (weight_bytes + kv_bytes) / self.bandwidth
        row = {
            "batch": batch, "mode": mode, "ms_per_step": 1000 * seconds, "tokens_per_s": batch / seconds,
            "weight_bytes_per_step": weight_bytes, "kv_bytes_per_step": kv_bytes,
            "experts_per_moe_layer": experts_per_layer, "bound_ms_per_step": 1000 * bound_s,
            "fraction_of_bound": bound_s / seconds, "launches_per_step": counts.launches_per_step,
            "host_syncs_per_step": counts.host_syncs_per_step,
            "device_to_host_copies_per_step": counts.device_to_host_copies_per_step,
        }
        print(f"  batch {batch} {mode:<8} {row['ms_per_step']:8.2f} ms/step, {row['tokens_per_s']:9.1f} tok/s, "
              f"{row['fraction_of_bound']:6.1%} of the bound, {row['launches_per_step']:.0f} launches/step", flush=True)
        return row

    def _steps(self, n: int) -> None:
        for _ in range(n):
            self.engine.step()

    def _timed_step(self) -> float:
        """Seconds of one step, device work included. The step ends by reading its tokens on the host, so
        synchronizing around it takes nothing from it that a server would overlap."""
        synchronize(self.device)
        start = time.perf_counter()
        self.engine.step()
        synchronize(self.device)
        return time.perf_counter() - start

    def _routing_census(self, steps: int) -> float:
        """Mean distinct experts a MoE layer runs per step, over `steps` decode steps."""
        distinct: list[int] = []

        def count(module, inputs, routed):  # routed: (weights [T, K], expert ids [T, K])
            distinct.append(routed[1].unique().numel())

        blocks = [m for m in self.model.modules() if isinstance(m, MoeBlock)]
        hooks = [block.router_module.register_forward_hook(count) for block in blocks]
        runner = self.engine.runner
        # a replayed graph or a compiled step calls no hook: count on eager steps
        graphs, compiled, runner.graphs, runner.compiled = runner.graphs, runner.compiled, None, None
        try:
            self._steps(steps)
        finally:
            runner.graphs, runner.compiled = graphs, compiled
            for hook in hooks:
                hook.remove()
        return sum(distinct) / len(distinct)

    def _resident_bytes_read(self, batch: int) -> int:
        """Every resident parameter is read once per step, but the embedding table: only B rows of it."""
        embedding = self.model.model.embed_tokens.weight
        tied = any(p is embedding for name, p in self.model.named_parameters() if not name.endswith("embed_tokens.weight"))
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if tied:  # the LM head reads the whole table anyway
            return total
        return total - embedding.numel() * embedding.element_size() + batch * embedding[0].numel() * embedding.element_size()

    def _kv_bytes_per_token(self) -> int:
        c = self.config
        return c.num_layers * 2 * c.num_kv_heads * c.head_dim * c.dtype.itemsize


def table(results: dict) -> str:
    note = results["host_syncs_note"]
    lines = [
        f"decode step, {results['preset']} ({results['layers']} layers, {results['dtype']}), every expert resident, "
        f"{results['device']}; bound at {results['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
        f"({results['copy_bandwidth_kind']}, reads + writes)",
        "",
        "| batch | mode | ms/step | tok/s | weight MB/step | KV MB/step | bound ms | of bound | launches/step | host syncs/step | first/repeat |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        syncs = "n/a" if r["host_syncs_per_step"] is None else f"{r['host_syncs_per_step']:.1f}"
        lines.append(
            f"| {r['batch']} | {r['mode']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['weight_bytes_per_step'] / 1e6:.1f} | {r['kv_bytes_per_step'] / 1e6:.2f} | "
            f"{r['bound_ms_per_step']:.3f} | {r['fraction_of_bound']:.1%} | {r['launches_per_step']:.0f} | {syncs} | "
            f"{'' if 'first_over_repeat' not in r else format(r['first_over_repeat'], '.2f')} |"
        )
    if note:
        lines += ["", f"host syncs {note}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
