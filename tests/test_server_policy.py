"""Policy variants and live policy switches: MODEL@NAME, GET/PUT /v1/policy, a switch under load.

Outputs are compared with offline `LLM`s loaded with the same policy: the log-probabilities of
every generated token (the tiny random model's greedy tokens rarely change with the policy, its
logprobs always do), so a request that ran even one step on the wrong policy's experts shows up.
"""

from __future__ import annotations

import gc
import re
import threading
import time
import weakref

import httpx
import pytest

from moeserve import LLM, SamplingParams
from moeserve.server import ServerConfig, create_app
from moeserve.server.background import BackgroundServer

RAW = {"default": {"codec": "raw"}}
LOSSY = {"default": {"codec": "szp", "mode": "rel", "error_bound": 1.0e-2}}
COARSE = "default: {codec: szp, mode: rel, error_bound: 0.2}\n"  # PUT body: YAML text
PROMPT = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def directory(checkpoint_factory):
    return checkpoint_factory("qwen3_moe", tokenizer=True)[0]


@pytest.fixture(scope="module", autouse=True)
def store_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOESERVE_CACHE_DIR", str(tmp_path_factory.mktemp("store-cache")))
        yield


@pytest.fixture(scope="module")
def served(directory):
    llm = LLM(directory, device="cpu", policy=RAW, expert_cache="50%", progress=False)
    config = ServerConfig(model_name="tiny", policies={"lossy": LOSSY})  # variants take the LLM's 50% cache
    with BackgroundServer(create_app(llm, config)) as background:
        with httpx.Client(base_url=background.url, timeout=60) as http:
            yield background, http


def offline(directory, policy, max_tokens: int) -> list[float]:
    """Logprobs of the greedy tokens under `policy`, offline."""
    llm = LLM(directory, device="cpu", policy=policy, expert_cache="50%", progress=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0)
    out = llm.generate([PROMPT], params)[0]
    return [entry[token] for token, entry in zip(out.token_ids, out.logprobs)]


BODY = {"prompt": PROMPT, "temperature": 0, "ignore_eos": True, "logprobs": 0}


def complete(http: httpx.Client, model: str, max_tokens: int = 16) -> dict:
    response = http.post("/v1/completions", json={**BODY, "model": model, "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    return response.json()


def logprobs(answer: dict) -> list[float]:
    return answer["choices"][0]["logprobs"]["token_logprobs"]


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b))


def bits_metric(http: httpx.Client, model: str) -> dict[str, float]:
    text = http.get("/metrics").text
    pattern = rf'^moeserve:expert_bits_per_value\{{layer="(\d+)",model_name="{re.escape(model)}"\}} (\S+)$'
    return {layer: float(v) for layer, v in re.findall(pattern, text, re.M)}


def test_named_variants_serve_their_own_policy(served, directory):
    background, http = served
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny", "tiny@lossy"]
    base, lossy = complete(http, "tiny"), complete(http, "tiny@lossy")
    assert base["system_fingerprint"] != lossy["system_fingerprint"]
    assert same(logprobs(base), offline(directory, RAW, 16))
    assert same(logprobs(lossy), offline(directory, LOSSY, 16))
    assert not same(logprobs(base), logprobs(lossy))
    described = http.get("/v1/policy", params={"model": "tiny@lossy"}).json()
    assert described["offloaded"] and {row["codec"] for row in described["layers"]} == {"szp"}
    assert all(0 < row["bits_per_value"] < 32 and row["bytes"] > 0 for row in described["layers"])
    assert bits_metric(http, "tiny@lossy") == {str(r["layer"]): r["bits_per_value"] for r in described["layers"]}


def test_bad_policies_are_refused_with_the_line(served):
    _, http = served
    response = http.put("/v1/policy", content=b"default:\n  codec: szp\n  eror_bound: 0.1\n")
    assert response.status_code == 400 and "line 3" in response.json()["error"]["message"]
    response = http.put("/v1/policy", content=b"/etc/passwd.yaml")  # never read as a server-side path
    assert response.status_code == 400 and "passwd" in response.json()["error"]["message"]
    assert http.put("/v1/policy", content=b"", params={"model": "tiny"}).status_code == 400
    assert http.put("/v1/policy", content=COARSE.encode(), params={"model": "other"}).status_code == 404


def test_switch_under_load_keeps_each_request_on_one_policy(served, directory):
    background, http = served
    before_bits = bits_metric(http, "tiny")
    old_fingerprint = complete(http, "tiny", 1)["system_fingerprint"]
    failures: list[str] = []
    answers: list[dict] = []
    stop = threading.Event()

    def load():  # clients that keep sending requests through the switch
        with httpx.Client(base_url=background.url, timeout=60) as client:
            while not stop.is_set():
                response = client.post("/v1/completions", json={**BODY, "model": "tiny", "max_tokens": 16})
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    answers.append(response.json())

    long_text: list[str] = []

    def long_request():  # admitted before the switch, finishing after it
        body = {**BODY, "model": "tiny", "max_tokens": 200}
        long_text.append(httpx.post(f"{background.url}/v1/completions", json=body, timeout=120).json())

    workers = [threading.Thread(target=load) for _ in range(3)]
    long_worker = threading.Thread(target=long_request)
    long_worker.start()
    engine = background.server.config.app.state.server.engine
    deadline = time.monotonic() + 60
    while engine.num_seqs == 0:  # the long request is admitted (on the old policy) before the switch
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for worker in workers:
        worker.start()
    while not answers:  # and some load is answered on the old policy, whatever the machine's speed
        assert time.monotonic() < deadline and not failures
        time.sleep(0.01)
    accepted = http.put("/v1/policy", content=COARSE.encode(), headers={"Content-Type": "application/yaml"})
    assert accepted.status_code == 202
    job_id = accepted.json()["id"]
    deadline = time.monotonic() + 60
    while (job := http.get(f"/v1/policy/jobs/{job_id}").json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job["status"] == "done" and job["progress"] == 1.0 and job["generation"] == 1, job
    switched = f"policy-{job['fingerprint'][:16]}"
    while not any(a["system_fingerprint"] == switched for a in answers):  # some load after the switch too
        assert time.monotonic() < deadline and not failures
        time.sleep(0.05)
    stop.set()
    for worker in (*workers, long_worker):
        worker.join(120)

    assert failures == []
    new_fingerprint = complete(http, "tiny", 1)["system_fingerprint"]
    assert new_fingerprint == switched != old_fingerprint
    assert {a["system_fingerprint"] for a in answers} <= {old_fingerprint, new_fingerprint}
    expected = {old_fingerprint: offline(directory, RAW, 16), new_fingerprint: offline(directory, COARSE, 16)}
    assert not same(expected[old_fingerprint], expected[new_fingerprint])  # the check below can tell them apart
    assert {a["system_fingerprint"] for a in answers} == {old_fingerprint, new_fingerprint}
    for answer in answers:
        assert same(logprobs(answer), expected[answer["system_fingerprint"]])
    (long_answer,) = long_text
    assert long_answer["system_fingerprint"] == old_fingerprint
    assert same(logprobs(long_answer), offline(directory, RAW, 200))
    after_bits = bits_metric(http, "tiny")
    assert after_bits.keys() == before_bits.keys() and after_bits != before_bits
    variant = background.server.config.app.state.server.variants.base
    assert variant.current.number == 1 and variant.retiring == []  # the old policy was released


class RecordingProvider:
    """Wraps a provider; records which provider served each MoE fetch."""

    def __init__(self, inner, log: list, name: str):
        self.inner, self.log, self.name = inner, log, name
        self.prediction_depth = 0

    def fetch(self, layer, experts):
        self.log.append(self.name)
        return self.inner.fetch(layer, experts)

    def prefetch(self, layer, experts):
        pass

    def stacked(self, layer):
        return None  # every fetch goes through the log


def test_engine_never_mixes_providers_in_a_step(directory):
    llm = LLM(directory, device="cpu")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    log: list[str] = []
    providers = [RecordingProvider(llm.experts, log, "a"), RecordingProvider(llm.experts, log, "b")]
    seqs = [llm.engine.make_sequence(p, params) for p in prompts]
    for i, seq in enumerate(seqs):
        llm.engine.submit(seq, providers[i % 2])
    moe_layers = len(llm.config.moe_layer_ids)
    steps = []
    while llm.engine.has_unfinished():
        log.clear()
        llm.engine.step()
        assert len(set(log)) == 1 and len(log) == moe_layers  # one provider per step
        steps.append(log[0])
    assert [s.output_ids for s in seqs] == expected
    assert steps[:4] == ["a", "b", "a", "b"]  # round-robin between the groups with work


def test_resident_model_switches_to_a_compressed_policy(directory):
    llm = LLM(directory, device="cpu")  # no policy: experts resident and uncompressed
    resident = weakref.ref(llm.experts)
    with BackgroundServer(create_app(llm, ServerConfig(model_name="tiny"))) as background:
        with httpx.Client(base_url=background.url, timeout=60) as http:
            assert http.get("/v1/policy").json()["offloaded"] is False
            assert bits_metric(http, "tiny") == {}
            job = http.put("/v1/policy", content=COARSE.encode()).json()
            deadline = time.monotonic() + 60
            while (job := http.get(f"/v1/policy/jobs/{job['id']}").json())["status"] != "done":
                assert job["status"] != "failed" and time.monotonic() < deadline, job
                time.sleep(0.05)
            described = http.get("/v1/policy").json()
            assert described["offloaded"] and described["fingerprint"] == job["fingerprint"]
            assert bits_metric(http, "tiny") and complete(http, "tiny", 2)["system_fingerprint"].startswith("policy-")
            assert llm.experts is None  # the server's first policy generation took them over
            while resident() is not None:  # retired, closed and dropped: nothing else holds them
                assert time.monotonic() < deadline
                gc.collect()
                time.sleep(0.05)
