"""The paged KV cache under a budget: admission by free blocks, preemption by recompute, refusals, windows.

A randomized load of 200 requests (mixed lengths, greedy and seeded sampling) runs with a KV cache of
40% of what they need at once: it must finish with preemptions, hold no more KV than the budget, and
give every request the output it gets alone. It is marked `exact`, so tests/test_exact_everywhere.py
repeats it at 1 and 4 threads; it runs once more here under ATEN_CPU_CAPABILITY=avx2 at 1 thread.
"""

from __future__ import annotations

import os
import random

import pytest

from early_runs import EarlyRun
from moeserve import LLM, SamplingParams
from moeserve.errors import MoeServeError

REQUESTS = 200


def random_load(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(REQUESTS):
        prompts.append([rng.randrange(vocab) for _ in range(rng.randint(1, 16))])
        options = dict(max_tokens=rng.randint(4, 32), ignore_eos=True)
        if i % 2:
            options.update(temperature=1.0, top_p=0.9, seed=rng.randrange(2**31))
        else:
            options.update(temperature=0.0)
        params.append(SamplingParams(**options))
    return prompts, params


@pytest.mark.exact
def test_a_load_over_budget_finishes_by_preempting_and_every_output_equals_the_request_alone(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe")
    probe = LLM(directory, device="cpu", progress=False)
    prompts, params = random_load(probe.config.vocab_size)
    needed = sum(len(p) + sp.max_tokens for p, sp in zip(prompts, params)) * probe.config.kv_bytes_per_token
    budget = int(0.4 * needed)
    llm = LLM(directory, device="cpu", kv_cache=budget, progress=False)
    outs = llm.generate(prompts, params)
    stats = llm.stats()
    assert stats["num_preemptions"] > 0
    assert stats["kv_blocks_peak"] * stats["kv_block_bytes"] <= budget
    assert llm.engine.runner.cache.nbytes <= budget
    assert stats["kv_blocks_in_use"] == 0  # every block came back
    for prompt, sp, out in zip(prompts, params, outs):
        (alone,) = llm.generate([prompt], sp)
        assert out.token_ids == alone.token_ids and len(out.token_ids) == sp.max_tokens


# started when collection ends (conftest), beside the rest of the session: it takes ~40 s on 2 cores
_AVX2_RUN = EarlyRun(["-k", "load_over_budget_finishes", __file__],
                     {"ATEN_CPU_CAPABILITY": "avx2", "MOESERVE_TEST_THREADS": "1"})


def start_early() -> None:
    if os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        _AVX2_RUN.start()


def stop_early() -> None:
    _AVX2_RUN.stop()


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "avx2", reason="this is the driver of the avx2 run")
def test_the_load_over_budget_holds_under_avx2_kernels_at_one_thread():
    result = _AVX2_RUN.result()
    assert result.returncode == 0, f"ATEN_CPU_CAPABILITY=avx2 run:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    assert result.stdout.splitlines()[-1].startswith("1 passed")


def test_a_request_that_cannot_fit_even_alone_is_refused_naming_the_budget(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe")
    probe = LLM(directory, device="cpu", progress=False)
    llm = LLM(directory, device="cpu", kv_cache=64 * probe.config.kv_bytes_per_token, progress=False)  # 64 positions
    with pytest.raises(MoeServeError, match=r"KV cache .* holds 48 for one sequence; raise kv_cache \(--kv-cache\)"):
        llm.generate([[1] * 40], SamplingParams(max_tokens=20))
    # without max_tokens a sequence stops, as at the end of the context, where the cache is full
    (out,) = llm.generate([[1] * 40], SamplingParams(max_tokens=None, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 48


def test_kv_cache_sizes_are_checked(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe")
    for bad, message in (("lots", "not understood"), ("0", "must be positive"), ("120%", "at most '100%'"),
                         (10, "raise kv_cache")):
        with pytest.raises(MoeServeError, match=message):
            LLM(directory, device="cpu", kv_cache=bad, progress=False)


def test_a_sliding_window_layer_holds_only_the_blocks_its_window_reaches(checkpoint_factory):
    directory, _ = checkpoint_factory("mixtral", sliding_window=128, max_position_embeddings=4096)
    llm = LLM(directory, device="cpu", progress=False)
    engine, manager = llm.engine, llm.engine.runner.blocks
    assert manager.windows == (128,)  # every layer slides: one group
    seq = engine.make_sequence([3, 4, 5], SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True))
    engine.submit(seq, llm.experts)
    most = 0
    while engine.has_unfinished():
        engine.step()
        if seq.blocks is not None:
            most = max(most, sum(block != 0 for block in seq.blocks.tables[0]))
    assert len(seq.output_ids) == 2000
    assert most <= 128 // manager.block_size + 2
    assert manager.peak_in_use <= 128 // manager.block_size + 2


def test_memory_plan_line_names_every_part(checkpoint_factory, capsys):
    directory, _ = checkpoint_factory("qwen3_moe")
    llm = LLM(directory, device="cpu", kv_cache="1MiB")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    tokens = llm.engine.runner.blocks.usable_blocks * llm.engine.runner.cache.block_size
    assert line.startswith("memory plan (cpu): weights ") and f"KV 1.0 MiB ({tokens:,} tokens)" in line
    assert "/ expert cache 0.0 MiB /" in line and line.endswith("/ workspace as needed")
