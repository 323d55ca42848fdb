"""What a new user meets at the HTTP edge (issue 19's list), against `moeserve serve` on the embedded
model: tokenizer endpoints, strict types, empty stop strings, 413 codes, and a giant prompt refused
without stalling /health or keeping its memory."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from moeserve import SamplingParams
from moeserve.errors import InputError

JSON = {"Content-Type": "application/json"}


def post_raw(url: str, path: str, text: str, **kwargs) -> httpx.Response:
    """A body sent as written (json.dumps would write NaN too, but the point is the literal text)."""
    return httpx.post(f"{url}{path}", content=text.encode(), headers=JSON, timeout=120, **kwargs)


def assert_one_sentence_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    message = error["message"]
    assert message.endswith(".") and "\n" not in message
    assert not re.search(r"\.\s+[A-Z]", message), f"more than one sentence: {message}"
    if param is not None:
        assert error["param"] == param, error
    return error


def test_tokenizer_endpoints_round_trip(default_server):
    url = default_server.url
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<|end|>" and info["bos_token"] is None
    assert "<|assistant|>" in info["chat_template"] and info["model_max_length"] == 256

    text = "What is 123 + 456?"
    tokenized = httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 256
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokenized["tokens"]}).json() == {"prompt": text}
    assert httpx.post(f"{url}/tokenize", json={"prompt": "<|end|>"}).json()["tokens"] == [info["eos_token_id"]]

    chat = httpx.post(
        f"{url}/tokenize", json={"messages": [{"role": "user", "content": text}], "return_token_strs": True}
    ).json()
    assert chat["token_strs"][0] == "<|user|>" and chat["token_strs"][-1] == "<|assistant|>"
    rendered = httpx.post(f"{url}/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert rendered == f"<|user|>{text}<|end|><|assistant|>"

    assert_one_sentence_error(httpx.post(f"{url}/detokenize", json={"tokens": [5, 768]}), 400, "tokens")
    assert_one_sentence_error(httpx.post(f"{url}/tokenize", json={}), 400, "prompt")
    assert_one_sentence_error(httpx.post(f"{url}/tokenize", json={"prompt": "x", "model": "nope"}), 404, "model")


WRONG_TYPES = [
    ('{"prompt": "x", "temperature": NaN}', "temperature", "finite number"),
    ('{"prompt": "x", "temperature": Infinity}', "temperature", "finite number"),
    ('{"prompt": "x", "top_p": -Infinity}', "top_p", "finite number"),
    ('{"prompt": "x", "frequency_penalty": NaN}', "frequency_penalty", "finite number"),
    ('{"prompt": "x", "max_tokens": true}', "max_tokens", "an integer"),
    ('{"prompt": "x", "n": false}', "n", "an integer"),
    ('{"prompt": "x", "stream": "yes"}', "stream", "true or false"),
    ('{"prompt": "x", "echo": 1}', "echo", "true or false"),
    ('{"prompt": "x", "logprobs": true}', "logprobs", "an integer"),
    ('{"prompt": "x", "max_tokens": "5"}', "max_tokens", "an integer"),
    ('{"prompt": [1, true]}', "prompt", "a list of token ids"),
    ('{"prompt": "x", "stop": 5}', "stop", "a string or a list of strings"),
]


@pytest.mark.parametrize("body,param,expected", WRONG_TYPES, ids=[b for b, _, _ in WRONG_TYPES])
def test_completions_types_are_strict(default_server, body, param, expected):
    error = assert_one_sentence_error(post_raw(default_server.url, "/v1/completions", body), 400, param)
    assert expected in error["message"]


def test_chat_types_are_strict(default_server):
    chat = '{"messages": [{"role": "user", "content": "hi"}], %s}'
    for field, param in [('"temperature": NaN', "temperature"), ('"logprobs": 1', "logprobs"),
                         ('"stream": "true"', "stream"), ('"max_completion_tokens": true', "max_completion_tokens")]:
        assert_one_sentence_error(post_raw(default_server.url, "/v1/chat/completions", chat % field), 400, param)


def test_empty_stop_strings_are_refused_in_both_forms(default_server):
    messages = []
    for stop in ("", [""], ["ok", ""]):
        body = {"prompt": "x", "max_tokens": 2, "stop": stop}
        error = assert_one_sentence_error(httpx.post(f"{default_server.url}/v1/completions", json=body), 400, "stop")
        messages.append(error["message"].split(", got")[0])
    assert len(set(messages)) == 1


def test_sampling_params_refuse_nan_inf_and_non_booleans():
    for options in (
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": float("nan")},
        {"temperature": True},
        {"max_tokens": True},
        {"ignore_eos": "yes"},
        {"stop": ""},
    ):
        with pytest.raises(InputError):
            SamplingParams(**options)


def test_every_413_carries_its_code(default_server):
    huge = json.dumps({"prompt": "a" * (5 * 2**20)}).encode()
    declared = httpx.post(f"{default_server.url}/v1/completions", content=huge, headers=JSON, timeout=60)

    def chunks():
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    chunked = httpx.post(f"{default_server.url}/v1/completions", content=chunks(), headers=JSON, timeout=60)
    for response in (declared, chunked):
        assert assert_one_sentence_error(response, 413)["code"] == "request_too_large"


def test_giant_prompt_is_refused_without_stalling_health_or_keeping_memory(default_server):
    """A 3 MiB prompt (under the 4 MiB body limit) is refused with a 400 from its length alone; while it
    is, /health answers in under 100 ms. Then four at once, as in the issue; afterwards the server's
    resident memory is within 10% of what it was before the first."""
    url = default_server.url
    httpx.post(f"{url}/v1/completions", json={"prompt": "What is 1 + 2?", "max_tokens": 2})  # warm
    before = default_server.rss_bytes()
    giant = json.dumps({"prompt": "a" * (3 * 2**20), "max_tokens": 4}).encode()
    responses: list[httpx.Response] = []

    def send():
        responses.append(httpx.post(f"{url}/v1/completions", content=giant, headers=JSON, timeout=120))

    latencies = []
    with httpx.Client(base_url=url, timeout=10) as health:
        health.get("/health")  # connection open before the giant body arrives
        sender = threading.Thread(target=send)
        sender.start()
        while sender.is_alive() or len(latencies) < 20:
            t0 = time.perf_counter()
            assert health.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.002)
    sender.join()
    assert max(latencies) < 0.1, max(latencies)

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert len(responses) == 5
    for response in responses:
        error = assert_one_sentence_error(response, 400, "prompt")
        assert "3145728 characters" in error["message"]
    after = default_server.rss_bytes()
    assert after <= 1.1 * before, (before, after)
