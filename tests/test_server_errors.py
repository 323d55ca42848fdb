"""Bad input gets a 4xx with OpenAI's error JSON, never a 500, and the server stays up; API key,
body size limit and the 429 of a full queue."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import openai
import pytest

from moeserve import LLM
from moeserve.server import ServerConfig, create_app
from moeserve.server.background import BackgroundServer

KEY = "sk-test-key"
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    llm = LLM(directory, device="cpu", max_num_seqs=1)
    config = ServerConfig(model_name="tiny", api_key=KEY, max_body_bytes=BODY_LIMIT, max_waiting=0)
    with BackgroundServer(create_app(llm, config)) as background:
        yield background


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].endswith(".") and "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


LONG_PROMPT = "hello world " * 200  # far past the 256-token context

BAD_COMPLETIONS = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": "two"}, "n"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "logprobs": 1000}, "logprobs"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": [10**6]}, None),
    ({"prompt": LONG_PROMPT}, None),
    ({}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS, ids=[json.dumps(b)[:40] for b, _ in BAD_COMPLETIONS])
def test_bad_completion_requests_are_400(http, body, param):
    assert_error(http.post("/v1/completions", json=body), 400, param)


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": LONG_PROMPT}]}, None),
]


@pytest.mark.parametrize("body,param", BAD_CHATS, ids=[json.dumps(b)[:40] for b, _ in BAD_CHATS])
def test_bad_chat_requests_are_400(http, body, param):
    assert_error(http.post("/v1/chat/completions", json=body), 400, param)


def test_malformed_bodies_unknown_model_and_routes(http):
    headers = {"Content-Type": "application/json"}
    assert_error(http.post("/v1/completions", content=b"{not json", headers=headers), 400)
    assert_error(http.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    assert_error(http.post("/v1/completions", content=b"\xff\xfe", headers=headers), 400)
    error = assert_error(http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model")
    assert error["code"] == "model_not_found"
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.delete("/v1/models"), 405)
    assert_error(http.get("/v1/policy/jobs/unknown"), 404)
    assert http.get("/health").status_code == 200


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_bug_is_a_500_with_one_traceback_in_the_log(server, http, monkeypatch):
    """Starlette's outermost middleware re-raises what the app's 500 handler answered, so that uvicorn
    logged each bug's traceback a second time."""

    def bug(*args):
        raise RuntimeError("a bug in moeserve")

    monkeypatch.setattr(server.server.config.app.state.server.completions, "create", bug)
    collected = _Records()
    loggers = [logging.getLogger(name) for name in ("moeserve.server", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(collected)
    try:
        error = assert_error(http.post("/v1/completions", json={"prompt": "x"}), 500)
    finally:
        for logger in loggers:
            logger.removeHandler(collected)
    assert error["message"] == "internal server error; the server log has the details."
    tracebacks = [r for r in collected.records if r.exc_info]
    assert len(tracebacks) == 1 and "a bug in moeserve" in str(tracebacks[0].exc_info[1])
    assert http.get("/health").status_code == 200


def test_huge_bodies_are_413_declared_or_chunked(http):
    huge = json.dumps({"prompt": "a" * (2 * BODY_LIMIT)}).encode()
    assert_error(http.post("/v1/completions", content=huge, headers={"Content-Type": "application/json"}), 413)

    def chunks():
        for start in range(0, len(huge), 8192):
            yield huge[start : start + 8192]

    assert_error(http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert http.get("/health").status_code == 200


def test_api_key(server):
    body = {"prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(f"{server.url}/v1/completions", json=body), 401)
    assert_error(httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(f"{server.url}/v1/models", headers={"Authorization": KEY}), 401)
    assert_error(httpx.get(f"{server.url}/tokenizer_info"), 401)  # the tokenizer endpoints are the API too
    assert_error(httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}), 401)
    authorized = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}, headers=authorized).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes and scrapers need no key
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny", prompt="x", max_tokens=1).choices[0].finish_reason in (
        "stop",
        "length",
    )


def test_full_server_answers_429(server, http):
    """max_num_seqs=1 and max_waiting=0: while one sequence runs, the next request is refused."""
    started = threading.Event()
    lines: list[str] = []

    def long_stream():
        body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                started.set()
                lines.append(line)

    worker = threading.Thread(target=long_stream)
    worker.start()
    assert started.wait(30)
    error = assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}), 429)
    assert error["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0).completions.create(
            model="tiny", prompt="x", max_tokens=1
        )
    worker.join(60)
    assert [line for line in lines if line][-1] == "data: [DONE]"
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
