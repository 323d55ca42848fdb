"""Inputs that used to hurt the server (issue 26), against `moeserve serve` on the embedded model: policy
bombs and deep nesting refused in under a second while /health keeps answering, lone surrogates, and the
documented contracts (stop_token_ids in the vocabulary, user content not null, a UTF-8 body)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from policy_bombs import DEEP_NESTING, alias_bomb
from test_server_edge import assert_one_sentence_error, post_raw

POLICY_BOMBS = {"aliases: 7 levels of 9, 497 bytes": (alias_bomb(7), "policy text, line 2, column 5: the anchor &a0")}
POLICY_BOMBS |= {f"nesting: {name}": (text, "policy text, line 1, column ") for name, text in DEEP_NESTING.items()}


@pytest.mark.parametrize("body,prefix", POLICY_BOMBS.values(), ids=POLICY_BOMBS.keys())
def test_policy_bomb_is_a_fast_400_while_health_answers(default_server, body, prefix):
    url = default_server.url
    outcome: dict = {}

    def attack():
        start = time.perf_counter()
        outcome["response"] = httpx.put(f"{url}/v1/policy", content=body.encode(), timeout=30)
        outcome["seconds"] = time.perf_counter() - start

    latencies = []
    with httpx.Client(base_url=url, timeout=5) as health:
        health.get("/health")  # connection open before the attack
        attacker = threading.Thread(target=attack)
        attacker.start()
        while attacker.is_alive() or len(latencies) < 20:
            start = time.perf_counter()
            assert health.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.002)
        attacker.join()
    assert max(latencies) < 0.2, max(latencies)
    assert outcome["seconds"] < 1.0, outcome["seconds"]
    message = assert_one_sentence_error(outcome["response"], 400)["message"]
    assert message.startswith(prefix) and ("anchor" in message or "nest" in message), message


def test_deeply_nested_json_body_is_a_400(default_server):
    for body in ('{"prompt": ' + "[" * 100_000, '{"prompt": "x", "stop": ' + '{"a": ' * 50_000):
        error = assert_one_sentence_error(post_raw(default_server.url, "/v1/completions", body), 400)
        assert "nests arrays or objects too deeply" in error["message"]


SURROGATES = [
    ("/v1/completions", '{"prompt": "12 \\ud800 3", "max_tokens": 2}', "prompt", "prompt contains a lone surrogate (U+D800) at character 3"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt", "prompt[1] contains a lone surrogate (U+DFFF)"),
    ("/v1/completions", '{"prompt": "ok", "stop": ["\\ud800"], "max_tokens": 2}', "stop", "stop contains a lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\\ud83d"}]}',
     "messages", "messages[1].content contains a lone surrogate (U+D83D)"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages", "messages[0].content contains a lone surrogate"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt", "prompt contains a lone surrogate"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages", "messages[0].content contains"),
]


@pytest.mark.parametrize("path,body,param,message", SURROGATES, ids=[f"{p} {b[:40]}" for p, b, _, _ in SURROGATES])
def test_lone_surrogates_are_a_400_naming_the_field(default_server, path, body, param, message):
    error = assert_one_sentence_error(post_raw(default_server.url, path, body), 400, param)
    assert error["message"].startswith(message), error["message"]


def test_a_surrogate_pair_is_one_character(default_server):
    for path, body in (("/tokenize", '{"prompt": "\\ud83d\\ude00"}'), ("/v1/completions", '{"prompt": "\\ud83d\\ude00"}')):
        assert post_raw(default_server.url, path, body).status_code == 200


def test_documented_contracts(default_server):
    client = openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0)
    vocab = httpx.get(f"{default_server.url}/tokenizer_info").json()["vocab_size"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="moeserve-default", prompt="x", max_tokens=2, extra_body={"stop_token_ids": [2, vocab]})
    assert caught.value.body["param"] == "stop_token_ids" and f"has {vocab}, which is not in the vocabulary" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="moeserve-default", messages=[{"role": "user", "content": None}], max_tokens=2)
    assert "messages[0].content is null or missing; a user message needs text content." in caught.value.message
    # An assistant message may go without content (it called tools), as OpenAI's schema has it.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "2 + 2?"}]
    assert client.chat.completions.create(model="moeserve-default", messages=messages, max_tokens=2).choices
    ok = client.completions.create(model="moeserve-default", prompt="x", max_tokens=2, extra_body={"stop_token_ids": [vocab - 1]})
    assert ok.choices

    for body in (b'{"prompt": "caf\xc3"}', b'{"prompt": "\xff\xfe"}'):
        response = httpx.post(f"{default_server.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
        error = assert_one_sentence_error(response, 400)
        assert error["message"].startswith("the request body is not valid UTF-8 (at byte "), error["message"]
