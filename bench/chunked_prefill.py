"""Chunked prefill through the HTTP server: running streams keep flowing while a long prompt prefills.

On bench/serving_model.py's model, with a step budget of --budget prompt tokens (max_num_batched_tokens) and a
prompt of 4x that:
  1. that prompt's time to first token alone (the fastest of 3), chunked (budget) and unchunked (a budget
     above its length);
  2. 8 streams decoding (32-token prompts) when it arrives: their longest gap between two tokens while it
     prefills, chunked and unchunked. Targets: chunked gap <= 0.5x its time to first token alone (chunked),
     and chunked time to first token <= 1.3x unchunked.
  3. with offloaded experts (szp rel 1e-3, expert cache 25%), the prompt alone at several chunk sizes: expert
     loads per chunk (misses + prefetches), in all, and time to first token; what the default chunk size
     (LLM's max_num_batched_tokens) is chosen by.

    python bench/chunked_prefill.py
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from serving_model import VOCAB, checkpoint, serve, stream_times  # noqa: E402

STREAMS = 8


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def alone(http, long_prompt: list[int], runs: int = 3) -> float:
    """The fastest of `runs` times to first token (the first run of a server also meets first-use costs)."""
    best = float("inf")
    for _ in range(runs):
        sent = time.perf_counter()
        times, _ = stream_times(http, long_prompt, 1)
        best = min(best, times[0] - sent)
    return best


def gap_while_prefilling(http, long_prompt: list[int]) -> tuple[float, float]:
    """(longest gap of any stream during the long prompt's prefill, the long prompt's time to first token)."""
    results: list[list[float]] = [[] for _ in range(STREAMS)]

    def stream(i: int) -> None:
        with httpx.Client(base_url=http.base_url, timeout=600) as own:  # a connection of its own per stream
            stream_times(own, prompt(1000 + i, 32), 400, results[i])

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    deadline = time.perf_counter() + 120
    while min(len(r) for r in results) < 10:  # every stream is decoding
        if time.perf_counter() > deadline or not all(thread.is_alive() for thread in threads):
            raise SystemExit("the streams did not all start decoding; see the server's log")
        time.sleep(0.01)
    sent = time.perf_counter()
    first = stream_times(http, long_prompt, 1)[0][0]
    for thread in threads:
        thread.join()
    gaps = [b - a for times in results for a, b in zip(times, times[1:]) if b > sent and a < first]
    return max(gaps), first - sent


def offloaded_chunks(directory: Path, long_prompt: list[int], sizes: list[int]) -> list[tuple[int, int, int, float]]:
    from moeserve import LLM, SamplingParams

    rows = []
    for size in sizes:
        llm = LLM(directory, device="cpu", progress=False, max_num_batched_tokens=size, prefix_caching=False,
                  policy={"default": {"codec": "szp", "mode": "rel", "error_bound": 1e-3}}, expert_cache="25%")
        llm.generate([prompt(5, 64)], SamplingParams(max_tokens=1))  # warm
        before = llm.offload.stats.snapshot()
        start = time.perf_counter()
        llm.generate([long_prompt], SamplingParams(max_tokens=1))
        seconds = time.perf_counter() - start
        after = llm.offload.stats.snapshot()
        loads = sum(after[k] - before[k] for k in ("misses", "prefetches_issued"))
        chunks = math.ceil(len(long_prompt) / size)
        rows.append((size, chunks, loads, seconds))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=512, help="prompt tokens per step (the chunk size)")
    parser.add_argument("--sizes", default="256,512,1024,2048", help="chunk sizes of part 3")
    args = parser.parse_args(argv)
    long_prompt = prompt(0, 4 * args.budget)
    with tempfile.TemporaryDirectory() as tmp:
        directory = checkpoint(Path(tmp) / "model")
        figures = {}
        for label, budget in (("chunked", args.budget), ("unchunked", 8 * args.budget)):
            with serve(directory, max_num_batched_tokens=budget, prefix_caching=False) as http:
                figures[label] = (alone(http, long_prompt), *gap_while_prefilling(http, long_prompt))
        rows = offloaded_chunks(directory, long_prompt, [int(s) for s in args.sizes.split(",")])
    print(f"a {len(long_prompt)}-token prompt, step budget {args.budget} prompt tokens; {STREAMS} streams decoding")
    print("| | time to first token alone | ... with the streams running | longest stream gap meanwhile | gap / alone |")
    print("|---|---|---|---|---|")
    for label, (ttft, gap, busy) in figures.items():
        print(f"| {label} | {ttft:.3f} s | {busy:.3f} s | {gap:.3f} s | {gap / ttft:.2f} |")
    chunked, unchunked = figures["chunked"][0], figures["unchunked"][0]
    print(f"targets: chunked gap / alone <= 0.5; chunked time to first token / unchunked = {chunked / unchunked:.2f} <= 1.3")
    print("\noffloaded experts (szp rel 1e-3, cache 25%), the prompt alone:")
    print("| chunk | chunks | expert loads | loads per chunk | time to first token |")
    print("|---|---|---|---|---|")
    for size, chunks, loads, seconds in rows:
        print(f"| {size} | {chunks} | {loads} | {loads / chunks:.1f} | {seconds:.3f} s |")


if __name__ == "__main__":
    main()
