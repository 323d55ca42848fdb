"""`moeserve serve --replicas 2` on Ray Serve, from outside, on one local cluster for the whole module: the
answers of one process, streaming, a policy variant, a policy switch on every replica, a replica killed
under load, and SIGTERM leaving no process behind."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve_process import ServeProcess

pytest.importorskip("ray.serve")

MODEL = "moeserve-default"
QUESTIONS = [f"What is {a} + {b}?" for a, b in ((12, 7), (85, 37), (123, 456), (9, 9))] + [
    f"What is {a} * {b}?" for a, b in ((12, 7), (6, 8), (11, 11), (25, 4))
]
LOSSY = "default: {codec: szp, mode: rel, error_bound: 1.0e-2}\n"


def _options(tmp: Path) -> list[str]:
    policy = tmp / "lossy.yaml"
    policy.write_text(LOSSY)
    return ["--policy", f"lossy={policy}", "--max-num-seqs", "16"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale-out")
    env = {"MOESERVE_CACHE_DIR": str(tmp / "cache"), "RAY_AUTH_MODE": "disabled"}
    server = ServeProcess(*_options(tmp), "--replicas", "2", "--cpus-per-replica", "0.5", "--drain-timeout", "5",
                          env=env, log=tmp / "serve.log")
    server.start(timeout=240)
    try:
        _wait_for_replicas(server.url, 2)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-process")
    with ServeProcess(*_options(tmp), env={"MOESERVE_CACHE_DIR": str(tmp / "cache")}) as server:
        yield server


def _wait_for_replicas(url: str, count: int, without_pid: int | None = None, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/health", timeout=10)
        if response.status_code == 200:
            replicas = response.json()["replicas"]
            if len(replicas) == count and all(r["pid"] != without_pid for r in replicas):
                return replicas
        time.sleep(0.5)
    raise AssertionError(f"{count} replicas were not live within {timeout} s")


def _client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _answers(server: ServeProcess, model: str, questions: list[str]) -> list[str]:
    client = _client(server)

    def ask(question: str) -> str:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0
        )
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        return list(pool.map(ask, questions))


def _successes_by_replica(server: ServeProcess) -> dict[str, float]:
    by_replica: dict[str, float] = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("moeserve:request_success_total"):
            replica = line.split('replica="')[1].split('"')[0]
            by_replica[replica] = by_replica.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return by_replica


def test_two_replicas_answer_32_concurrent_requests_as_one_process_does(cluster, one_process):
    questions = QUESTIONS * 4
    before = sum(_successes_by_replica(cluster).values())
    assert _answers(cluster, MODEL, questions) == _answers(one_process, MODEL, questions)
    # a replica's metrics reach the scrape at its next sync with the Board (ray_board.SYNC_SECONDS): right after
    # the answers, one that answered may not show yet
    deadline = time.monotonic() + 30
    while sum((served := _successes_by_replica(cluster)).values()) < before + len(questions):
        assert time.monotonic() < deadline, f"the scrape counts {served} successes, not {before} + {len(questions)}"
        time.sleep(0.25)
    assert sum(count > 0 for count in served.values()) == 2  # both replicas answered some


def test_streaming_and_the_policy_variant(cluster, one_process):
    client = _client(cluster)
    prompt = "<|user|>Sort these numbers: 5, 2, 9<|end|><|assistant|>"
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert streamed == whole.choices[0].text and streamed
    variant = f"{MODEL}@lossy"
    assert _answers(cluster, variant, QUESTIONS[:4]) == _answers(one_process, variant, QUESTIONS[:4])
    assert variant in {m.id for m in client.models.list()}


def test_a_policy_switch_reaches_every_replica(cluster):
    body = "default: {codec: szp, mode: rel, error_bound: 3.0e-2}\n"
    put = httpx.put(f"{cluster.url}/v1/policy", params={"model": f"{MODEL}@lossy"}, content=body, timeout=30)
    assert put.status_code == 202, put.text
    job_id, deadline = put.json()["id"], time.monotonic() + 60
    while (job := httpx.get(f"{cluster.url}/v1/policy/jobs/{job_id}").json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job["status"] == "done" and len(job["replicas"]) == 2, job
    views = [httpx.get(f"{cluster.url}/v1/policy", params={"model": f"{MODEL}@lossy"}).json() for _ in range(6)]
    assert all(view == views[0] for view in views) and views[0]["generation"] == 1
    assert views[0]["fingerprint"] == job["fingerprint"]
    bad = httpx.put(f"{cluster.url}/v1/policy", content="default: {codec: nope}\n")
    assert bad.status_code == 400 and "codec" in bad.json()["error"]["message"]


def test_a_replica_killed_under_load_fails_its_requests_cleanly_and_comes_back(cluster):
    before = _wait_for_replicas(cluster.url, 2)
    victim = before[0]
    load = {"model": MODEL, "prompt": "<|user|>Sort these numbers: 5, 2, 9<|end|><|assistant|>",
            "max_tokens": 200, "ignore_eos": True, "n": 4, "stream": True}

    def stream() -> tuple[int, list[str]]:
        with httpx.stream("POST", f"{cluster.url}/v1/completions", json=load, timeout=60) as response:
            return response.status_code, [line for line in response.iter_lines() if line]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream) for _ in range(8)]
        time.sleep(2)
        os.kill(victim["pid"], signal.SIGKILL)
        ended = [s.result(timeout=60) for s in streams]  # none hangs
    assert all(status in (200, 503) for status, _ in ended)
    cut = [events for _, events in ended if "stopped before it finished" in " ".join(events[-2:])]
    assert cut, "no request was on the killed replica"
    assert all(events[-1] == "data: [DONE]" for status, events in ended if status == 200)
    assert _answers(cluster, MODEL, QUESTIONS) == _answers(cluster, MODEL, QUESTIONS)  # the survivor serves
    back = {r["id"] for r in _wait_for_replicas(cluster.url, 2, without_pid=victim["pid"])}
    restarted = back - {r["id"] for r in before}
    assert len(restarted) == 1
    deadline = time.monotonic() + 30
    while not _served_by(cluster, restarted):
        assert time.monotonic() < deadline, "the restarted replica served nothing"
        _answers(cluster, MODEL, QUESTIONS)


def _served_by(server: ServeProcess, replica_ids: set[str]) -> bool:
    return any(_successes_by_replica(server).get(rid, 0.0) > 0 for rid in replica_ids)


def test_sigterm_stops_the_application_and_every_process_it_started(cluster):
    started = _descendants(cluster.process.pid)
    assert len(started) > 5  # the cluster: GCS, raylet, controller, proxy, front, board, replicas
    cluster.process.send_signal(signal.SIGTERM)
    assert cluster.process.wait(90) == 0
    deadline = time.monotonic() + 20
    while (left := [p for p in started if _alive(*p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [_command(pid) for pid, _ in left]


def _descendants(root: int) -> list[tuple[int, str]]:
    """Every process below `root`, as (pid, start time) so that a reused pid is not mistaken for it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(_stat(int(entry.name))[1], []).append(int(entry.name))
            except OSError:
                pass
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            found.append((pid, _stat(pid)[2]))
        except OSError:
            continue
        todo += children.get(pid, [])
    return found


def _stat(pid: int) -> tuple[str, int, str]:
    """State, parent pid and start time from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), fields[19]


def _alive(pid: int, start: str) -> bool:
    try:
        state, _, started = _stat(pid)
    except OSError:
        return False
    return started == start and state != "Z"


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
