"""Aggregate decode throughput of `moeserve serve` with 1 and with N concurrent streaming clients.

Starts the server in its own process (so the clients' HTTP parsing does not share its interpreter),
on the embedded default model when it is installed, else on a random stand-in of its shape built
with transformers (qwen3_moe, 8 layers, 8 experts top-2, hidden 128, expert width 256, vocab 768,
bf16, with a byte-level BPE tokenizer). Each client sends streaming completions back to back:
random token-id prompts (fixed seed), `ignore_eos`, a fixed number of new tokens, so every request
costs the same. One warm-up round, then the concurrency levels in turn, repeated; the best round of
each level is kept. Prints tokens/s per level and its ratio to one client (the issue's target:
>= 4x at 16 clients on CPU), with TTFT and inter-token latency medians.

    python bench/server_throughput.py [--model DIR] [--concurrency 1 16] [--requests 2] [--new-tokens 64]
        [--prompt-tokens 32] [--repeats 2] [--threads N] [--serve-args "--dtype float32 --expert-cache 25%"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def build_checkpoint(directory: str) -> None:
    """A random model of the embedded default model's shape (moeserve/eval/train_model.py), and a tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = 768
    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=vocab,
        hidden_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        intermediate_size=256,
        max_position_embeddings=256,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([Path(__file__).read_text()] * 4, trainer)
    tokenizer.save(str(Path(directory) / "tokenizer.json"))
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: str | None, port: int, max_num_seqs: int, extra: list[str], threads: int | None
) -> subprocess.Popen:
    command = [sys.executable, "-m", "moeserve.cli", "serve", "--port", str(port), "--max-num-seqs", str(max_num_seqs)]
    command += (["--model", model] if model else []) + extra
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None  # torch's intra-op threads
    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a full pipe would stall the server
    server = subprocess.Popen(command, stdout=log, stderr=log, text=True, env=env)
    server.log = log
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            server.log.seek(0)
            raise SystemExit(f"the server exited: {server.log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not become healthy in 10 minutes")


async def one_request(client: httpx.AsyncClient, prompt: list[int], new_tokens: int) -> tuple[int, float, list[float]]:
    """→ generated tokens, time to first token, gaps between chunks."""
    body = {
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                continue
            if first is None:
                first = now - start
            elif last is not None:
                gaps.append(now - last)
            last = now
    return tokens, first or 0.0, gaps


async def run_level(url: str, concurrency: int, requests: int, prompts: list[list[int]], new_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(w: int):
            return [
                await one_request(client, prompts[(w * requests + r) % len(prompts)], new_tokens)
                for r in range(requests)
            ]

        start = time.perf_counter()
        results = [
            item for per_worker in await asyncio.gather(*(worker(w) for w in range(concurrency))) for item in per_worker
        ]
        seconds = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50": statistics.median(r[1] for r in results),
        "itl_p50": statistics.median(g for r in results for g in r[2]) if any(r[2] for r in results) else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="checkpoint directory (default: embedded model, else a random one)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests per client per round")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server (default: torch's)")
    parser.add_argument("--serve-args", default="", help='extra `moeserve serve` options, e.g. "--expert-cache 25%%"')
    args = parser.parse_args()

    from moeserve.assets import DEFAULT_MODEL_DIR

    model, label = args.model, args.model
    tmp = None
    if model is None and not (DEFAULT_MODEL_DIR / "config.json").is_file():
        tmp = tempfile.TemporaryDirectory()
        build_checkpoint(tmp.name)
        model, label = (
            tmp.name,
            "random stand-in of the default model's shape (8 layers, 8 experts top-2, hidden 128, bf16)",
        )
    label = label or "embedded default model"
    vocab = json.loads((Path(model or DEFAULT_MODEL_DIR) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(64)]

    port = free_port()
    server = start_server(model, port, max(args.concurrency), shlex.split(args.serve_args), args.threads)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(run_level(url, max(args.concurrency), 1, prompts, args.new_tokens))  # warm-up
        best: dict[int, dict] = {}
        for _ in range(args.repeats):  # levels interleaved, so background load hits them alike
            for level in args.concurrency:
                result = asyncio.run(run_level(url, level, args.requests, prompts, args.new_tokens))
                if level not in best or result["tokens_per_s"] > best[level]["tokens_per_s"]:
                    best[level] = result
    finally:
        server.terminate()
        server.wait(60)
        if tmp is not None:
            tmp.cleanup()

    base = best[args.concurrency[0]]["tokens_per_s"]
    print(
        f"model: {label}; {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens per request, "
        f"{args.requests} requests per client, best of {args.repeats}; {os.cpu_count()} CPUs, server threads: "
        f"{args.threads or 'default'}; serve args: {args.serve_args or '-'}"
    )
    print("| clients | requests | tokens | seconds | tokens/s | vs 1 client | TTFT p50 (s) | ITL p50 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for level in args.concurrency:
        r = best[level]
        print(
            f"| {level} | {r['requests']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / base:.2f}x | {r['ttft_p50']:.3f} | {1000 * r['itl_p50']:.1f} |"
        )


if __name__ == "__main__":
    main()
