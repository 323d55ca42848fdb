"""The OpenAI-compatible API through the official `openai` client, against a real server on a free port.

Every generated answer is compared with the offline engine (`LLM.generate` / `chat` / `score`) on the
same tiny checkpoint, so a response that looks right but differs from the model's output fails.
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.server import ServerConfig, create_app
from moeserve.server.background import BackgroundServer

MODEL = "tiny"
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def reference(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    return LLM(directory, device="cpu")


@pytest.fixture(scope="module")
def server(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    llm = LLM(directory, device="cpu", max_num_seqs=8)
    with BackgroundServer(create_app(llm, ServerConfig(model_name=MODEL))) as background:
        yield background


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(max_tokens: int, **options) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **options)


def test_models_health_and_metric_names(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "moeserve:request_success_total",
        "moeserve:time_to_first_token_seconds",
        "moeserve:inter_token_latency_seconds",
        "moeserve:e2e_request_latency_seconds",
        "moeserve:request_queue_time_seconds",
        "moeserve:num_requests_running",
        "moeserve:num_requests_waiting",
        "moeserve:prompt_tokens_total",
        "moeserve:generation_tokens_total",
    ):
        assert name in text, name


def test_completion_streamed_and_not_equal_offline_greedy(client, reference):
    (expected,) = reference.generate([PROMPT], greedy(12))
    extra = {"ignore_eos": True}
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extra)
    assert whole.choices[0].text == expected.text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens == len(expected.prompt_token_ids)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_prompt_lists_and_token_ids(client, reference):
    prompts = [[5, 6, 7], [9, 9, 9, 9]]
    expected = [o.text for o in reference.generate(prompts, greedy(6))]
    out = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected


def test_chat_streamed_and_not_equal_offline(client, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    (expected,) = reference.chat([messages], greedy(10))
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 10


def _ascii_stop(text: str) -> str:
    """A two-character stop string from the second half of `text`, printable ASCII only."""
    for start in range(len(text) // 2, len(text) - 1):
        piece = text[start : start + 2]
        if piece.isascii() and piece.isprintable():
            return piece
    pytest.skip("the reference output has no printable ASCII pair to stop on")


def test_stop_string_cuts_text_and_streams_nothing_past_it(client, reference):
    (full,) = reference.generate([PROMPT], greedy(40))
    stop = _ascii_stop(full.text)
    expected = full.text[: full.text.index(stop)]
    extra = {"ignore_eos": True}
    whole = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop], extra_body=extra
    )
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop, stream=True, extra_body=extra
    )
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_n_and_seed(client):
    def sample(n: int, seed: int):
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, n=n, seed=seed)
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first, again = sample(2, seed=7), sample(2, seed=7)
    assert len(first) == 2 and first == again
    assert first[0] != first[1]
    assert sample(1, seed=7) == first[:1]
    assert sample(2, seed=8) != first


def test_completion_logprobs_with_echo_match_the_model(client, reference):
    """What lm-eval's local-completions loglikelihood reads: echo=True, logprobs=1, max_tokens=1."""
    prompt = [5, 17, 33, 2, 64, 8]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    logits = torch.log_softmax(reference.score(prompt), dim=-1)  # [T, V]; row t predicts t+1
    for t in range(1, len(prompt)):
        assert math.isclose(lp.token_logprobs[t], logits[t - 1, prompt[t]].item(), abs_tol=1e-4)
        assert math.isclose(max(lp.top_logprobs[t].values()), logits[t - 1].max().item(), abs_tol=1e-4)
    assert math.isclose(lp.token_logprobs[-1], logits[-1].max().item(), abs_tol=1e-4)  # greedy token
    assert out.choices[0].text.startswith(reference.tokenizer.decode(prompt, skip_special_tokens=False))
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert len(scored.choices[0].logprobs.token_logprobs) == len(prompt) and scored.usage.completion_tokens == 0


def test_chat_logprobs(client, reference):
    messages = [{"role": "user", "content": "fox"}]
    out = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-6)  # greedy = the best
