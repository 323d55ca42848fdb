"""bench/decode_step.py on a CPU: its byte counts against the model's own sizes, its launch counter against
a function of known ops, and one whole run on a one-layer tiny preset. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # last: bench/codecs.py must not shadow anything

import decode_step  # noqa: E402
from decode_step_profile import copy_bandwidth, count_per_step  # noqa: E402
from throughput_models import preset_config  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_launches_are_the_aten_ops_each_step_calls():
    x, w = torch.ones(64), torch.ones(3, 64)

    def two_steps():
        for _ in range(2):
            torch.add(x, 1)  # calls aten::to, _to_copy, ... for the scalar: not counted
            torch.mul(x, 2)
            torch.nn.functional.linear(x[None], w)  # unsqueeze, then linear (which calls t, matmul, mm)

    counts = count_per_step(two_steps, 2, CPU)
    assert counts.launches_per_step == 4
    assert counts.host_syncs_per_step is None and counts.device_to_host_copies_per_step is None


def test_copy_bandwidth_is_a_plausible_memory_rate():
    rate = copy_bandwidth(CPU, 16 * 2**20, repeats=2)
    assert 1e8 < rate < 1e13  # between 0.1 GB/s and 10 TB/s


def test_a_run_reports_every_batch_and_mode_with_the_model_bytes(tmp_path):
    out = tmp_path / "decode.json"
    argv = ["--device", "cpu", "--preset", "tiny", "--layers", "1", "--batches", "1,2", "--prompt-len", "8",
            "--steps", "2", "--profile-steps", "1", "--threads", "1", "--out", str(out)]
    assert decode_step.main(argv) == 0
    results = json.loads(out.read_text())
    rows = results["rows"]
    modes = ["greedy", "greedy-repeat", "sampled"]
    assert [(r["batch"], r["mode"]) for r in rows] == [(b, m) for b in (1, 2) for m in modes]
    for first, repeat in (rows[0:2], rows[3:5]):  # new lengths against the same lengths again
        assert first["first_over_repeat"] == pytest.approx(first["ms_per_step"] / repeat["ms_per_step"])
    c = preset_config("tiny", 1)
    d, i, item = c.hidden_size, c.moe_intermediate_size, c.dtype.itemsize
    attention = d * c.num_heads * c.head_dim * 2 + d * c.num_kv_heads * c.head_dim * 2  # q, o and k, v
    resident = (attention + d * c.num_experts + 3 * d + c.vocab_size * d) * item  # + router, 3 norms, LM head
    expert = 3 * d * i * item
    kv_per_token = 2 * c.num_kv_heads * c.head_dim * item
    context = 8 + 1 + decode_step.WARMUP_STEPS + (2 - 1) / 2
    for r in rows:
        assert 1 <= r["experts_per_moe_layer"] <= min(c.num_experts, r["batch"] * c.top_k)
        embedding_rows = r["batch"] * d * item
        assert r["weight_bytes_per_step"] == pytest.approx(resident + embedding_rows + r["experts_per_moe_layer"] * expert)
        assert r["kv_bytes_per_step"] == pytest.approx(kv_per_token * r["batch"] * context)
        assert r["bound_ms_per_step"] == pytest.approx(
            1000 * (r["weight_bytes_per_step"] + r["kv_bytes_per_step"]) / results["copy_bandwidth_bytes_per_s"])
        assert r["fraction_of_bound"] == pytest.approx(r["bound_ms_per_step"] / r["ms_per_step"])
        assert r["ms_per_step"] > 0 and r["launches_per_step"] > 0 and r["host_syncs_per_step"] is None
    assert rows[0]["experts_per_moe_layer"] == c.top_k  # one token: exactly its top-k
    assert "n/a" in results["host_syncs_note"]
