"""KV memory under a mixed load: what the paged cache holds against what the load needs, and peak RSS.

The load (issue "Paged KV cache under one memory plan"): one prompt of 8,000 tokens among 63 of 32, 8 new
tokens each, greedy, through `LLM.generate` on a 4-layer model with Mixtral's attention shape (8 KV heads
x 128, float32: 32 KiB of KV per token) and small random experts, written by transformers' save_pretrained.

Printed, per run (each in a fresh process, so RSS is its own):
  needed KV            every sequence's final length x KV bytes per token
  KV allocated         the most blocks held at once x bytes per block (the bound: needed + one block a sequence)
  peak RSS growth      sampled every 5 ms from the end of loading to the end of the load
  fixed overhead       the same load's largest step alone (the 8,000-token prompt, 1 new token): its RSS growth
                       less its own KV; activations and workspaces that do not grow with the KV held
  time                 wall time of the load

    python bench/kv_memory.py                       # the paged cache, this tree
    python bench/kv_memory.py --before HEAD~5       # also the same load on another revision (dense rows)

`--before REV` runs the load from a `git worktree` of REV in a subprocess and reports its KV allocation as
that revision's cache reports it (`cache.nbytes`) with its time and RSS; the dense rows of revisions before
the paged cache need about 17 GB of RAM for this load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LONG, SHORT, COUNT, NEW = 8000, 32, 63, 8


def write_checkpoint(directory: Path) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=1024, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
        head_dim=128, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=16384, rope_theta=1e6, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).to(torch.float32).save_pretrained(directory)


class RssSampler:
    """Peak resident set size of this process, sampled from /proc every 5 ms."""

    def __init__(self):
        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.current())

    def __enter__(self):
        self.base = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def run_load(model_dir: str, mode: str) -> dict:
    """One load in this process ("mixed": the whole load; "alone": the long prompt, one new token)."""
    import torch

    from moeserve import LLM, SamplingParams

    torch.manual_seed(0)
    llm = LLM(model_dir, device="cpu", max_num_seqs=64, progress=False)
    if mode == "mixed":
        prompts = [torch.randint(0, 1024, (LONG,)).tolist()] + [torch.randint(0, 1024, (SHORT,)).tolist() for _ in range(COUNT)]
        new = NEW
    else:
        prompts, new = [torch.randint(0, 1024, (LONG,)).tolist()], 1
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    cache = llm.engine.runner.cache
    per_token = llm.config.kv_bytes_per_token
    with RssSampler() as rss:
        start = time.perf_counter()
        llm.generate(prompts, params)
        seconds = time.perf_counter() - start
    manager = getattr(cache, "manager", None)
    allocated = manager.peak_in_use * cache.bytes_per_block if manager is not None else cache.nbytes
    return {
        "mode": mode,
        "sequences": len(prompts),
        "needed": sum(len(p) + new for p in prompts) * per_token,
        "allocated": allocated,
        "block_bytes": getattr(cache, "bytes_per_block", 0),
        "rss_growth": rss.peak - rss.base,
        "seconds": seconds,
    }


def in_subprocess(tree: Path, model_dir: str, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--model", model_dir],
        cwd=tree, env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"the {mode} run in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report(label: str, mixed: dict, alone: dict | None) -> None:
    print(f"\n{label}")
    print(f"  needed KV        {mib(mixed['needed'])}")
    print(f"  KV allocated     {mib(mixed['allocated'])} ({mixed['allocated'] / mixed['needed']:.2f}x needed)")
    if mixed["block_bytes"]:
        bound = mixed["needed"] + mixed["sequences"] * mixed["block_bytes"]
        verdict = "holds" if mixed["allocated"] <= bound else "FAILS"
        print(f"  bound            needed + one block a sequence = {mib(bound)}: {verdict}")
    print(f"  peak RSS growth  {mib(mixed['rss_growth'])} ({mixed['rss_growth'] / mixed['needed']:.2f}x needed)")
    if alone is not None:
        overhead = max(0, alone["rss_growth"] - alone["needed"])
        bound = 1.2 * mixed["needed"] + overhead
        verdict = "holds" if mixed["rss_growth"] <= bound else "FAILS"
        print(f"  fixed overhead   {mib(overhead)} (the long prompt alone: {mib(alone['rss_growth'])} RSS, "
              f"{mib(alone['needed'])} of it KV)")
        print(f"  RSS bound        1.2 x needed + overhead = {mib(bound)}: {verdict}")
    print(f"  time             {mixed['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, metavar="REV", help="also run the load on this git revision")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, choices=["mixed", "alone"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_load(args.model, args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "model")
        write_checkpoint(Path(model_dir))
        print(f"load: 1 prompt of {LONG} tokens + {COUNT} of {SHORT}, {NEW} new tokens each; "
              "4 layers, 8 KV heads x 128, float32 (32 KiB of KV per token)")
        alone = in_subprocess(REPO, model_dir, "alone")
        report("paged KV cache (this tree)", in_subprocess(REPO, model_dir, "mixed"), alone)
        if args.before:
            tree = Path(tmp) / "before"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before], cwd=REPO, check=True,
                           capture_output=True)
            try:
                report(f"revision {args.before}", in_subprocess(tree, model_dir, "mixed"), None)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)


if __name__ == "__main__":
    main()
