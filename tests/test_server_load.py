"""Concurrency: 32 streaming clients against offline greedy output, disconnects free their slots,
shutdown drains. On the embedded default model when it is installed, else on a tiny checkpoint
(the same code path; only the weights differ).

Both the server and the offline reference compute in float32: on CPU, bf16 matrix products round
differently for different batch sizes, so greedy answers could legitimately depend on which requests
shared a step; in float32 the engine's answers do not depend on the batch."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import openai
import pytest

from moeserve import LLM, SamplingParams
from moeserve.assets import DEFAULT_MODEL_DIR
from moeserve.server import ServerConfig, create_app
from moeserve.server.background import BackgroundServer

HAS_DEFAULT_MODEL = (DEFAULT_MODEL_DIR / "config.json").is_file()
CLIENTS = 32


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory):
    if HAS_DEFAULT_MODEL:
        return None  # LLM(model=None): the embedded default model
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    return directory


@pytest.fixture(scope="module")
def served(model_dir):
    llm = LLM(model_dir, device="cpu", dtype="float32", max_num_seqs=CLIENTS)
    with BackgroundServer(create_app(llm, ServerConfig(model_name="m"))) as background:
        yield background, llm


def running_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(r"^moeserve:num_requests_running\{[^}]*\} (\S+)$", text, re.M))


def wait_until_idle(url: str, llm: LLM, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        scheduler = llm.engine.scheduler
        if (
            running_requests(url) == 0
            and not scheduler.running
            and not scheduler.waiting
            and llm.engine.runner.blocks.blocks_in_use == 0
        ):
            return
        time.sleep(0.05)
    raise AssertionError("the server did not free the request's slot and KV cache row")


def test_concurrent_streaming_clients_get_offline_greedy_answers(served, model_dir):
    background, _ = served
    prompts = [f"What is {i} + {2 * i + 1}?" for i in range(CLIENTS)]
    reference = LLM(model_dir, device="cpu", dtype="float32")
    expected = [o.text for o in reference.generate(prompts, SamplingParams(max_tokens=24, temperature=0))]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str]:
        stream = await client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0, stream=True)
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def all_clients():
        client = openai.AsyncOpenAI(base_url=f"{background.url}/v1", api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, p) for p in prompts))

    answers = asyncio.run(all_clients())
    assert [text for text, _ in answers] == expected
    assert all(finish in ("stop", "length") for _, finish in answers)


def test_disconnect_mid_stream_frees_the_slot(served):
    background, llm = served
    body = {"model": "m", "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{background.url}/v1/completions", json=body, timeout=60) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                assert running_requests(background.url) == 1
                break  # leaving the block closes the connection mid-stream
    wait_until_idle(background.url, llm)
    text = httpx.get(f"{background.url}/metrics").text
    assert re.search(r'moeserve:request_success_total\{finished_reason="abort",model_name="m"\} [1-9]', text)


def test_disconnect_while_waiting_for_a_whole_response_frees_the_slot(served):
    background, llm = served
    body = {"model": "m", "prompt": "hello", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{background.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    wait_until_idle(background.url, llm)


def test_shutdown_drains_running_streams(model_dir):
    llm = LLM(model_dir, device="cpu")
    background = BackgroundServer(create_app(llm, ServerConfig(model_name="m"))).start()
    body = {"model": "m", "prompt": "hello", "max_tokens": 60, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    stopper = None
    with httpx.stream("POST", f"{background.url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 2 and stopper is None:  # mid-stream: ask the server to stop, as SIGTERM does
                stopper = threading.Thread(target=background.stop)
                stopper.start()
    stopper.join(60)
    assert lines[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in lines[-2]
    app_state = background.server.config.app.state.server
    assert not app_state.engine.healthy  # the step thread stopped after the drain
