"""Prefix caching and chunked prefill through the engine: same outputs as without, fewer tokens computed.

For every family, requests that share a prefix give the same greedy and seeded tokens with the cache as
without it (log-probabilities within 1e-5: a cached prefix was computed in another step's shapes), and the
later ones find the earlier ones' blocks. Prompt logprobs come back from the cache for the cached positions.
Two policies never share a block, in the engine and through the server (MODEL against MODEL@NAME). A prompt
prefilled in chunks gives what one pass gives.
"""

from __future__ import annotations

import httpx
import pytest

from conftest import FAMILY_CONFIGS
from moeserve import LLM, SamplingParams
from moeserve.server import ServerConfig, create_app
from moeserve.server.background import BackgroundServer

SHARED = [(7 * i + 3) % 97 + 1 for i in range(40)]  # 40 tokens: two full blocks of 16 to share
PROMPTS = [SHARED + [5, 6], SHARED + [9], SHARED[:20] + [11, 12, 13], SHARED + [5, 6, 8]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
SEEDED = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True, logprobs=1)


def one_by_one(llm: LLM, params: SamplingParams):
    """Each prompt after the previous finished, so later ones can find earlier ones' blocks."""
    return [llm.generate([prompt], params)[0] for prompt in PROMPTS]


def assert_same_outputs(cached, plain) -> None:
    for a, b in zip(cached, plain):
        assert a.token_ids == b.token_ids
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            assert lp_a.keys() == lp_b.keys() and max(abs(lp_a[t] - lp_b[t]) for t in lp_a) <= 1e-5


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_outputs_with_the_prefix_cache_equal_outputs_without(checkpoint_factory, model_type):
    directory, _ = checkpoint_factory(model_type)
    cached = LLM(directory, device="cpu", progress=False)
    plain = LLM(directory, device="cpu", prefix_caching=False, progress=False)
    hits = []
    for params in (GREEDY, SEEDED):
        ours, theirs = one_by_one(cached, params), one_by_one(plain, params)
        assert_same_outputs(ours, theirs)
        hits.append([o.num_cached_tokens for o in ours])
        assert all(o.num_cached_tokens == 0 for o in theirs)
    assert hits == [[0, 32, 16, 32], [32, 32, 16, 32]]  # the second pass finds the first one's blocks too
    stats = cached.stats()
    assert stats["prefix_cache_hits"] > 0 and plain.stats()["prefix_cache_queries"] == 0


def test_prompt_logprobs_of_cached_positions_come_from_the_cache(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe")
    cached = LLM(directory, device="cpu", progress=False)
    plain = LLM(directory, device="cpu", prefix_caching=False, progress=False)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    choices = [SHARED + [20 + k, 30 + k] for k in range(4)]  # one context, four continuations
    ours = [cached.generate([c], params)[0] for c in choices]
    theirs = plain.generate(choices, params)
    assert [o.num_cached_tokens for o in ours] == [0, 32, 32, 32]
    for a, b in zip(ours, theirs):
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) and a.prompt_logprobs[0] is None
        for lp_a, lp_b in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert lp_a.keys() == lp_b.keys() and max(abs(lp_a[t] - lp_b[t]) for t in lp_a) <= 1e-5
    # another number of logprobs: the cached entries do not serve it, so it computes the prompt
    (other,) = cached.generate([choices[0]], SamplingParams(max_tokens=1, prompt_logprobs=2))
    assert other.num_cached_tokens == 0 and len(other.prompt_logprobs) == len(choices[0])


def test_another_provider_never_shares_a_block(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe")
    llm = LLM(directory, device="cpu", progress=False)
    other = llm.experts.with_overrides({})  # the same weights, another provider: its own salt
    llm.generate([PROMPTS[0]], GREEDY)
    assert llm.generate([PROMPTS[0]], GREEDY, experts=other)[0].num_cached_tokens == 0
    assert llm.generate([PROMPTS[0]], GREEDY)[0].num_cached_tokens == 32


def test_a_prompt_prefilled_in_chunks_gives_what_one_pass_gives(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe")
    long_prompt = [(5 * i + 1) % 90 + 1 for i in range(100)]
    short_steps = LLM(directory, device="cpu", max_num_batched_tokens=16, prefix_caching=False, progress=False)
    one_pass = LLM(directory, device="cpu", prefix_caching=False, progress=False)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    mixed = [long_prompt, PROMPTS[1], PROMPTS[2]]  # the short ones decode while the long one prefills
    ours, theirs = short_steps.generate(mixed, params), one_pass.generate(mixed, params)
    assert_same_outputs(ours, theirs)
    for a, b in zip(ours, theirs):
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs)
        for lp_a, lp_b in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert max(abs(lp_a[t] - lp_b[t]) for t in lp_a) <= 1e-5


def test_a_policy_variant_never_shares_the_base_models_blocks(checkpoint_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path / "store-cache"))
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    llm = LLM(directory, device="cpu", policy={"default": {"codec": "raw"}}, expert_cache="50%", progress=False)
    lossy = {"default": {"codec": "szp", "mode": "rel", "error_bound": 1.0e-2}}
    config = ServerConfig(model_name="tiny", policies={"lossy": lossy})
    body = {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0}

    def cached_tokens(http: httpx.Client, model: str) -> int:
        response = http.post("/v1/completions", json={**body, "model": model})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    with BackgroundServer(create_app(llm, config)) as background:
        with httpx.Client(base_url=background.url, timeout=60) as http:
            assert cached_tokens(http, "tiny") == 0
            assert cached_tokens(http, "tiny@lossy") == 0  # the same prompt, another policy
            assert cached_tokens(http, "tiny@lossy") == 32
            assert cached_tokens(http, "tiny") == 32
            metrics = http.get("/metrics").text
    assert 'moeserve:prefix_cache_hits_total{model_name="tiny"} 64.0' in metrics
