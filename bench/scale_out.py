"""Scale-out on Ray Serve: aggregate throughput of `moeserve serve --replicas 1` against `--replicas 2` at 16
clients, and the prefix-cache hit rate of a shared-prefix load under the default router against prefix
affinity, in one run.

Each setting is a real `moeserve serve --replicas N` (a local Ray cluster of its own, 1 torch thread and
--cpus-per-replica per replica) on the embedded default model. Throughput: each client sends non-streamed
greedy completions back to back (random token-id prompts, `ignore_eos`, a fixed number of new tokens);
one warm-up round, then the best of --repeats rounds. Hit rate: prompts made of one of --prefixes shared
prefixes of --prefix-tokens tokens and a distinct tail, sent by 16 clients; the share of prompt tokens
the server reports in `usage.prompt_tokens_details.cached_tokens`. While the engine has no prefix cache,
responses carry no such field and the hit rate is reported as absent.

    python bench/scale_out.py [--clients 16] [--requests 4] [--new-tokens 32] [--repeats 2]
        [--cpus-per-replica 1] [--skip-hit-rate]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

VOCAB_SAFE = range(20, 700)  # ordinary token ids of the embedded model (specials sit below)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`moeserve serve --replicas N ...` until stopped with SIGTERM, as a user runs it."""

    def __init__(self, replicas: int, cpus: float, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "moeserve.cli", "serve", "--port", str(self.port), "--replicas",
                   str(replicas), "--cpus-per-replica", str(cpus), "--max-num-seqs", "16", *extra]
        env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
        self.log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a full pipe would stall the server
        self.process = subprocess.Popen(command, stdout=self.log, stderr=self.log, text=True, env=env)
        self.replicas = replicas

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited: {self.log.read()[-3000:]}")
            try:
                health = httpx.get(f"{self.url}/health", timeout=2)
                if health.status_code == 200 and len(health.json()["replicas"]) == self.replicas:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the application did not become healthy in time")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)

    def __enter__(self) -> Server:
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def run_clients(url: str, prompts: list[list[list[int]]], new_tokens: int) -> tuple[int, int, int | None, float]:
    """Client i sends prompts[i] back to back. → completion tokens, prompt tokens, cached tokens (None when
    no response reports any), seconds."""
    totals = {"completion": 0, "prompt": 0, "cached": None}

    async def client(mine: list[list[int]], http: httpx.AsyncClient) -> None:
        for prompt in mine:
            body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
            response = await http.post("/v1/completions", json=body)
            response.raise_for_status()
            usage = response.json()["usage"]
            totals["completion"] += usage["completion_tokens"]
            totals["prompt"] += usage["prompt_tokens"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if cached is not None:
                totals["cached"] = (totals["cached"] or 0) + cached

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(mine, http) for mine in prompts))
        seconds = time.perf_counter() - start
    return totals["completion"], totals["prompt"], totals["cached"], seconds


def random_prompts(rng: random.Random, clients: int, requests: int, length: int) -> list[list[list[int]]]:
    return [[[rng.choice(VOCAB_SAFE) for _ in range(length)] for _ in range(requests)] for _ in range(clients)]


def shared_prefix_prompts(rng: random.Random, args) -> list[list[list[int]]]:
    prefixes = [[rng.choice(VOCAB_SAFE) for _ in range(args.prefix_tokens)] for _ in range(args.prefixes)]
    return [
        [rng.choice(prefixes) + [rng.choice(VOCAB_SAFE) for _ in range(16)] for _ in range(args.requests)]
        for _ in range(args.clients)
    ]


def throughput(replicas: int, args) -> float:
    rng = random.Random(0)
    with Server(replicas, args.cpus_per_replica, []) as server:
        asyncio.run(run_clients(server.url, random_prompts(rng, args.clients, 1, 32), args.new_tokens))  # warm-up
        best = 0.0
        for _ in range(args.repeats):
            prompts = random_prompts(rng, args.clients, args.requests, 32)
            tokens, _, _, seconds = asyncio.run(run_clients(server.url, prompts, args.new_tokens))
            best = max(best, tokens / seconds)
    return best


def hit_rate(routing: str, args) -> float | None:
    rng = random.Random(1)
    with Server(2, args.cpus_per_replica, ["--routing", routing]) as server:
        prompts = shared_prefix_prompts(rng, args)
        _, prompt_tokens, cached, _ = asyncio.run(run_clients(server.url, prompts, 4))
    return None if cached is None else cached / prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client per round")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--prefixes", type=int, default=4, help="shared prefixes in the hit-rate load")
    parser.add_argument("--prefix-tokens", type=int, default=64)
    parser.add_argument("--skip-hit-rate", action="store_true")
    args = parser.parse_args()

    rates = {replicas: throughput(replicas, args) for replicas in (1, 2)}
    print(f"{args.clients} clients, {args.new_tokens} new tokens, 1 torch thread and "
          f"{args.cpus_per_replica:g} CPU per replica ({os.cpu_count()} cores here):")
    for replicas, rate in rates.items():
        print(f"  {replicas} replica{'s' if replicas > 1 else ''}: {rate:7.1f} tok/s ({rate / rates[1]:.2f}x)")
    if args.skip_hit_rate:
        return
    print(f"shared-prefix load ({args.prefixes} prefixes of {args.prefix_tokens} tokens), 2 replicas:")
    for routing in ("power-of-two", "prefix-affinity"):
        rate = hit_rate(routing, args)
        shown = "absent (no usage.prompt_tokens_details.cached_tokens: the engine has no prefix cache yet)" \
            if rate is None else f"{100 * rate:.1f}% of prompt tokens cached"
        print(f"  {routing}: {shown}")


if __name__ == "__main__":
    main()
