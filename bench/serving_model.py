"""The model and server the serving benchmarks share: a random qwen3_moe checkpoint served in-process.

`checkpoint(directory)` writes a 4-layer qwen3_moe (hidden 512, 16 experts top-4, 4,096 positions) with
transformers' save_pretrained; `serve(directory, **llm_options)` runs `moeserve`'s app on it in a
background thread and yields an httpx client. Prompts are token ids, so lengths are exact.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import httpx

VOCAB = 2048


def checkpoint(directory: Path) -> Path:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64, intermediate_size=1024, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
        max_position_embeddings=4096, norm_topk_prob=True, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).to(torch.float32).save_pretrained(directory)
    return directory


@contextlib.contextmanager
def serve(directory: Path, **llm_options) -> Iterator[httpx.Client]:
    from moeserve import LLM
    from moeserve.server import ServerConfig, create_app
    from moeserve.server.background import BackgroundServer

    llm = LLM(directory, device="cpu", progress=False, **llm_options)
    with BackgroundServer(create_app(llm, ServerConfig(model_name="bench"))) as background:
        with httpx.Client(base_url=background.url, timeout=600) as http:
            yield http


def stream_times(
    http: httpx.Client, prompt: list[int], max_tokens: int, times: list[float] | None = None
) -> tuple[list[float], dict]:
    """Stream a completion: the arrival time of each chunk that carries a token (time.perf_counter), appended
    to `times` as they arrive, and the final usage."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0}  # a chunk per token: no tokenizer, no text
    times = [] if times is None else times
    usage = {}
    with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices"):
                times.append(time.perf_counter())
    return times, usage
