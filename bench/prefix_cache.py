"""Prefix caching through the HTTP server, with and without it, in one run (bench/serving_model.py's model).

(a) lm-eval-shaped multiple choice: 50 items x 4 choices after one 400-token shared context, scored as lm-eval's
    local-completions scores them (echo, logprobs=1, max_tokens=0), 16 prompts a request, requests in turn.
    Prints prompt tokens computed (prompt tokens less usage's cached_tokens) and wall time; targets: computed
    drops >= 3.5x and wall time >= 2x against --no-prefix-caching.
(b) an 8-turn chat that resends its history (each turn adds a 200-token message; 32-token answers):
    time to first token per turn; target: turn 8 <= 1.5x turn 1 with the cache.
(c) no shared prefix: 48 random 256-token prompts, 32 new tokens each, 8 clients at once; generated tokens/s,
    median of --rounds interleaved rounds; target: within 3% of no caching.

    python bench/prefix_cache.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from serving_model import VOCAB, checkpoint, serve, stream_times  # noqa: E402


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def multiple_choice(http) -> tuple[int, int, float]:
    rng = random.Random(0)
    context = tokens(rng, 400)
    prompts = []
    for _ in range(50):
        question = tokens(rng, 20)
        prompts += [context + question + tokens(rng, 4) for _ in range(4)]
    total = computed = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), 16):
        body = {"model": "bench", "prompt": prompts[i : i + 16], "max_tokens": 0, "echo": True, "logprobs": 1}
        usage = http.post("/v1/completions", json=body).raise_for_status().json()["usage"]
        total += usage["prompt_tokens"]
        computed += usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    return total, computed, time.perf_counter() - start


def chat(http) -> list[float]:
    """Time to first token of each turn. The resent answers are stand-in tokens (the model has no tokenizer
    to give its own back), so each turn computes its new message and the previous answer, 232 tokens."""
    rng = random.Random(1)
    history: list[int] = []
    first_token = []
    for _ in range(8):
        history += tokens(rng, 200)
        sent = time.perf_counter()
        times, _ = stream_times(http, history, 32)
        first_token.append(times[0] - sent)
        history += tokens(rng, 32)
    return first_token


def no_shared_prefix(http, seed: int) -> float:
    rng = random.Random(100 + seed)
    prompts = [tokens(rng, 256) for _ in range(48)]
    body = {"model": "bench", "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: http.post("/v1/completions", json={**body, "prompt": p}).raise_for_status(), prompts))
    return 48 * 32 / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (c)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = checkpoint(Path(tmp) / "model")
        results: dict[bool, dict] = {}
        throughput: dict[bool, list[float]] = {True: [], False: []}
        for caching in (True, False):
            with serve(directory, prefix_caching=caching) as http:
                results[caching] = {"choice": multiple_choice(http), "chat": chat(http)}
        for round_ in range(args.rounds):
            for caching in (True, False):
                with serve(directory, prefix_caching=caching) as http:
                    throughput[caching].append(no_shared_prefix(http, round_))
    on, off = results[True], results[False]
    total, computed_on, seconds_on = on["choice"]
    _, computed_off, seconds_off = off["choice"]
    print("(a) multiple choice, 50 items x 4 choices after a 400-token shared context")
    print(f"    prompt tokens {total:,}; computed: {computed_on:,} cached vs {computed_off:,} uncached "
          f"({computed_off / computed_on:.2f}x fewer, target >= 3.5x)")
    print(f"    wall time: {seconds_on:.2f} s cached vs {seconds_off:.2f} s ({seconds_off / seconds_on:.2f}x faster, target >= 2x)")
    print("(b) 8-turn chat resending its history, time to first token per turn (s)")
    for label, ttft in (("cached", on["chat"]), ("uncached", off["chat"])):
        print(f"    {label:>8}: " + " ".join(f"{t:.3f}" for t in ttft) + f"  turn 8 / turn 1 = {ttft[-1] / ttft[0]:.2f}x")
    print("    target: cached turn 8 <= 1.5x turn 1")
    with_cache, without = statistics.median(throughput[True]), statistics.median(throughput[False])
    print(f"(c) no shared prefix, 8 clients: {with_cache:.1f} tok/s cached vs {without:.1f} uncached "
          f"(ratio {with_cache / without:.3f}, target >= 0.97; medians of {args.rounds} interleaved rounds)")


if __name__ == "__main__":
    main()
