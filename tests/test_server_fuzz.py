"""Fuzzing the request models through the real server: whatever JSON a client sends to the
generation and tokenizer endpoints, the answer is never a 5xx, and every error is OpenAI's error
JSON. Values are drawn from every JSON type, including the NaN and ±Infinity literals that
Python's JSON parser accepts, for the fields the models declare (and for unknown ones)."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeserve import LLM
from moeserve.server import ServerConfig, create_app
from moeserve.server.background import BackgroundServer

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, -1, 16, 255, 256, 10**9])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", "x", "<|end|>", "What is 1 + 2?"])
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

COMPLETION_FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stop_token_ids",
                     "ignore_eos", "skip_special_tokens", "stream", "stream_options", "logprobs", "echo", "best_of",
                     "suffix", "presence_penalty", "frequency_penalty", "logit_bias", "user", "model"]
CHAT_FIELDS = ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed", "stop",
               "stream", "stream_options", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format",
               "add_generation_prompt", "model"]
TOKENIZE_FIELDS = ["prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs", "model"]
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 5])},
                          optional={"content": json_values, "name": json_values}),
    max_size=3,
)


def bodies(fields: list[str], base: dict):
    """`base` (a request that would run briefly), with a random subset of fields set to random values."""
    overrides = st.dictionaries(st.sampled_from(fields + ["unknown_field"]), json_values, max_size=5)
    special = st.fixed_dictionaries({}, optional={"messages": messages, "prompt": st.lists(st.integers(-5, 300), max_size=4)})
    return st.builds(lambda o, s: {**base, **s, **o}, overrides, special)


@pytest.fixture(scope="module")
def url(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    llm = LLM(directory, device="cpu", max_num_seqs=4)
    with BackgroundServer(create_app(llm, ServerConfig(model_name="tiny", max_n=4))) as background:
        yield background.url


def check(url: str, path: str, body) -> None:
    text = json.dumps(body, allow_nan=True)
    response = httpx.post(f"{url}{path}", content=text, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"].endswith("."), error
    elif response.headers["content-type"].startswith("application/json"):
        response.json()
    else:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.text.rstrip().endswith("data: [DONE]")


FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=bodies(COMPLETION_FIELDS, {"prompt": "hello", "max_tokens": 2}))
def test_completions_never_5xx(url, body):
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 4)  # keep a valid request short
    check(url, "/v1/completions", body)


@FUZZ
@given(body=bodies(CHAT_FIELDS, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
def test_chat_never_5xx(url, body):
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int) and not isinstance(body[name], bool):
            body[name] = min(body[name], 4)
    check(url, "/v1/chat/completions", body)


@FUZZ
@given(body=bodies(TOKENIZE_FIELDS, {"prompt": "hello"}))
def test_tokenize_never_5xx(url, body):
    check(url, "/tokenize", body)


@FUZZ
@given(body=st.dictionaries(st.sampled_from(["tokens", "model"]), json_values, max_size=2)
       | st.fixed_dictionaries({"tokens": st.lists(st.integers(-(2**65), 2**65), max_size=6)}))
def test_detokenize_never_5xx(url, body):
    check(url, "/detokenize", body)


@FUZZ
@given(body=json_values)
def test_any_json_body_never_5xx(url, body):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        check(url, path, body)
