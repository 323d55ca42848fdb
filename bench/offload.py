"""Offloaded, compressed experts against the all-resident uncompressed model, on the CPU.

For each policy (szp at rel 1e-3 and rel 1e-2 by default) and cache size (10%, 25%, 50%, 100% of
all experts), times greedy decoding of the same prompts and reports tokens/s (and its ratio to
the all-resident run in the same process), hit rate, prefetch use, wait time, and expert memory:
decoded cache + compressed store, as a fraction of the uncompressed experts. The issue's targets:
rel 1e-3 at 25% cache >= 0.6x resident tokens/s; rel 1e-2 at 25% cache memory <= 60%.

Threads: the resident run uses torch's default; the offloaded runs then get what `moeserve generate`,
`eval` and `serve` give offloaded CPU runs, a core left per decode worker (--threads N pins every run
to N instead).

    python bench/offload.py [--model DIR] [--new-tokens 48] [--batch 1] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from moeserve import LLM, SamplingParams
from moeserve.offload.cache import SlotPool
from moeserve.offload.filler import default_decode_workers, leave_cores_for_decoding

POLICIES = {
    "szp rel 1e-3": {"default": {"codec": "szp", "mode": "rel", "error_bound": 1e-3}},
    "szp rel 1e-2": {"default": {"codec": "szp", "mode": "rel", "error_bound": 1e-2}},
}
CACHES = ("10%", "25%", "50%", "100%")


def tokens_per_second(llm: LLM, prompts, params: SamplingParams, repeats: int) -> float:
    llm.generate(prompts, params)  # warm-up: fills caches, first-call allocations
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, params)
        best = min(best, time.perf_counter() - start)
    return len(prompts) * params.max_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for every run (default: torch's for the resident run, then "
                             "what the CLI gives offloaded runs: a core left per decode worker)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MOESERVE_CACHE_DIR", tempfile.mkdtemp(prefix="moeserve-bench-"))

    resident = LLM(args.model, device="cpu")
    config = resident.config
    prompts = [[(7 * i + j) % config.vocab_size for j in range(16)] for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    base = tokens_per_second(resident, prompts, params, args.repeats)
    expert_bytes = SlotPool.slot_nbytes(config.hidden_size, config.moe_intermediate_size, config.dtype)
    uncompressed = expert_bytes * len(config.moe_layer_ids) * config.num_experts
    print(f"model {resident.model_dir}: {len(config.moe_layer_ids)} MoE layers x {config.num_experts} experts, "
          f"{uncompressed / 2**20:.1f} MiB of experts ({config.dtype}); batch {args.batch}, {args.new_tokens} new tokens, "
          f"torch threads {torch.get_num_threads()}")
    print(f"all resident, uncompressed: {base:.1f} tok/s")
    header = (f"{'policy':<14} {'cache':>5} {'slots':>5} {'tok/s':>7} {'x resident':>10} {'hit rate':>8} "
              f"{'pf used/issued':>14} {'wait s':>7} {'expert mem':>10}")
    print(header)
    if not args.threads:
        leave_cores_for_decoding(default_decode_workers())
    for name, policy in POLICIES.items():
        for cache in CACHES:
            llm = LLM(args.model, device="cpu", policy=policy, expert_cache=cache, progress=False)
            llm.offload.stats.reset()
            speed = tokens_per_second(llm, prompts, params, args.repeats)
            stats = llm.offload.stats
            pool = llm.offload.provider.pool  # slots: experts the cache holds (bfloat16 slots hold twice as many)
            memory = pool.nbytes + llm.offload.store.nbytes
            print(f"{name:<14} {cache:>5} {pool.num_slots:>5} {speed:>7.1f} {speed / base:>9.2f}x {stats.hit_rate:>8.2f} "
                  f"{stats.prefetches_used:>6}/{stats.prefetches_issued:<7} {stats.wait_seconds:>7.3f} "
                  f"{memory / uncompressed:>9.0%}")
            llm.offload.provider.close()
    print(f"offloaded runs: torch threads {torch.get_num_threads()}, {llm.offload.options.workers} decode "
          f"worker(s)")
    again = tokens_per_second(resident, prompts, params, args.repeats)
    print(f"all resident, measured again at the end with {torch.get_num_threads()} torch threads: {again:.1f} tok/s "
          f"(ratios above use the first, {base:.1f}; a large gap means other load on the machine skewed them)")


if __name__ == "__main__":
    main()
