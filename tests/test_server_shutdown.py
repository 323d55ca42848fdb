"""SIGTERM as docs/server.md describes it, on the real `moeserve serve`: during the drain every request
(/health included) gets 503 while the port stays open; a stream still running when --drain-timeout ends
gets a final error event and [DONE]; the log has no traceback; the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai

from serve_process import ServeProcess

# One sequence at a time, and 16 choices of 250 tokens each: thousands of decode steps, seconds of work
# that are still running when the 2 s drain ends.
LONG = {"model": "tiny", "prompt": "hello", "max_tokens": 250, "ignore_eos": True, "n": 16, "stream": True}


def test_sigterm_drains_with_503s_then_cuts_streams_cleanly_and_exits_0(checkpoint_factory, tmp_path):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    log = tmp_path / "serve.log"
    options = ("--model", str(directory), "--served-model-name", "tiny", "--max-num-seqs", "1", "--drain-timeout", "2")
    server = ServeProcess(*options, log=log).start()
    try:
        lines: list[str] = []
        streaming = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG, timeout=60) as response:
                for line in response.iter_lines():
                    streaming.set()
                    lines.append(line)

        reader = threading.Thread(target=stream)
        reader.start()
        assert streaming.wait(60)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        queued = client.completions.create(model="tiny", prompt="hi", max_tokens=8, stream=True)  # waits its turn

        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        health = httpx.get(f"{server.url}/health", timeout=5)
        assert health.status_code == 503 and "shutting down" in health.json()["error"]["message"]
        try:
            client.completions.create(model="tiny", prompt="x", max_tokens=1)
            raise AssertionError("a request during the drain was served")
        except openai.InternalServerError as refused:
            assert refused.status_code == 503 and "shutting down" in refused.message

        try:
            for _ in queued:
                pass
            raise AssertionError("the queued stream ended without the drain's error")
        except openai.APIError as cut:
            assert "shut down before this response finished" in cut.message
        reader.join(30)
        events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "service_unavailable" and "gives running requests 2 s" in error["message"]
        assert server.process.wait(30) == 0
    finally:
        server.stop()
    text = log.read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]
