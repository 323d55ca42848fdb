"""Decode-step time of this tree against another revision, interleaved: the cost of a change to the KV path.

Runs bench/decode_step.py (CPU, tiny preset by default) alternately from this tree and from a `git worktree`
of REV, --rounds times each, every run in a fresh process, and prints per batch size the median ms/step of
the greedy and sampled passes on each side and their ratio (this tree / REV; below 1.05 is within 5%).
Alternating keeps a machine's drift (other load, clocks) out of the ratio.

    python bench/kv_decode_compare.py --before fd757ba            # the dense rows, before the paged cache
    python bench/kv_decode_compare.py --before fd757ba --threads 1 --rounds 7
    python bench/kv_decode_compare.py --before fd757ba --threads 1 --cpu-time --rounds 15

--cpu-time times greedy steps by the CPU time of the process (bench/kv_decode_probe.py, run from this tree
over each side's package) instead of decode_step.py's wall time: on a shared virtual machine wall time moves
by +-10% from run to run, and at one torch thread CPU time is what a step costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("greedy-repeat", "sampled")


def run_once(tree: Path, args: argparse.Namespace, out: Path) -> dict[tuple[int, str], float]:
    command = [sys.executable, str(tree / "bench" / "decode_step.py"), "--device", "cpu", "--preset", args.preset,
               "--batches", args.batches, "--steps", str(args.steps), "--out", str(out)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"decode_step.py in {tree} failed:\n{result.stderr[-3000:]}")
    rows = json.loads(out.read_text())["rows"]
    return {(r["batch"], r["mode"]): r["ms_per_step"] for r in rows if r["mode"] in MODES}


def probe_once(tree: Path, args: argparse.Namespace) -> dict[tuple[int, str], float]:
    command = [sys.executable, str(REPO / "bench" / "kv_decode_probe.py"), "--batches", args.batches,
               "--steps", str(args.steps), "--threads", str(args.threads or 1)]
    result = subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"kv_decode_probe.py over {tree} failed:\n{result.stderr[-3000:]}")
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    return {(int(batch), "greedy, CPU time"): ms for batch, ms in rows.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, metavar="REV", help="the revision to compare with")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu-time", action="store_true", help="greedy steps timed by process CPU time (see above)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            samples: dict[str, dict[tuple[int, str], list[float]]] = {"this tree": {}, args.before: {}}
            for round_ in range(args.rounds):
                for label, tree in (("this tree", REPO), (args.before, before)):
                    measured = probe_once(tree, args) if args.cpu_time else run_once(tree, args, Path(tmp) / "out.json")
                    for key, ms in measured.items():
                        samples[label].setdefault(key, []).append(ms)
                print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, check=False)
    threads = args.threads or "torch's default"
    print(f"decode step, CPU, preset {args.preset}, {threads} threads: median ms/step of {args.rounds} interleaved runs")
    print(f"| batch | mode | this tree | {args.before} | ratio |")
    print("|---|---|---|---|---|")
    for key in sorted(samples["this tree"]):
        ours, theirs = (statistics.median(samples[label][key]) for label in ("this tree", args.before))
        print(f"| {key[0]} | {key[1]} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.3f} |")


if __name__ == "__main__":
    main()
