"""bench/throughput.py's own pieces: synthetic experts, the naive-offload baseline, one whole run on tiny shapes.

No timing is asserted: only that the baseline computes what the resident model computes, that the
synthetic weights look like weights, and that a run writes every configuration's row.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # last: bench/codecs.py must not shadow anything

import throughput  # noqa: E402
from throughput_baseline import NaiveOffloadProvider, host_copies  # noqa: E402
from throughput_models import WEIGHT_SCALE, heavy_tailed, synthetic_workload  # noqa: E402
from throughput_report import markdown_table  # noqa: E402

from moeserve.engine.llm_engine import LLMEngine  # noqa: E402
from moeserve.engine.sampling_params import SamplingParams  # noqa: E402
from moeserve.experts import DenseExpertProvider  # noqa: E402
from moeserve.offload.cache import SlotPool  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These shapes are far too small to gain from threads, and on a busy machine torch's OpenMP threads
    wait for each other (several times slower); restored afterwards for the rest of the suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_heavy_tailed_weights_have_the_scale_and_tails_of_real_ones():
    generator = torch.Generator().manual_seed(0)
    w = heavy_tailed((512, 512), torch.float32, CPU, generator).double()
    assert 0.5 * WEIGHT_SCALE < w.std().item() < 2 * WEIGHT_SCALE
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert kurtosis > 5  # a Gaussian's is 3


def test_synthetic_experts_are_the_same_on_every_pass_and_drawn_lazily():
    workload = synthetic_workload("tiny", layers=2, device=CPU, seed=0)
    first = [(layer, list(weights)) for layer, weights in workload.experts()]
    layer, lazy = next(workload.experts())
    assert not isinstance(lazy, (list, tuple))  # one expert at a time, never a whole layer held
    again = next(lazy)
    assert torch.equal(again.gate, first[0][1][0].gate) and torch.equal(again.down, first[0][1][0].down)
    assert not torch.equal(first[0][1][0].gate, first[0][1][1].gate)
    assert first[0][1][0].gate.dtype == torch.bfloat16 and len(first) == 2 and len(first[0][1]) == 8


def _greedy_tokens(engine: LLMEngine, provider, prompts: list[list[int]]) -> list[list[int]]:
    seqs = [engine.make_sequence(p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)) for p in prompts]
    for seq in seqs:
        engine.submit(seq, provider)
    while engine.has_unfinished():
        engine.step()
    return [seq.output_ids for seq in seqs]


def test_naive_offload_computes_what_the_resident_experts_compute():
    workload = synthetic_workload("tiny", layers=2, device=CPU, seed=1)
    c = workload.config
    engine = LLMEngine(workload.model, None, CPU, max_model_len=64, max_num_seqs=4)
    prompts = [[5, 9, 200, 31, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
    resident = DenseExpertProvider({layer: list(weights) for layer, weights in workload.experts()})
    pool = SlotPool(c.top_k, c.hidden_size, c.moe_intermediate_size, c.dtype, CPU)  # the smallest cache
    naive = NaiveOffloadProvider(host_copies(workload.experts(), pin=False), pool)
    assert _greedy_tokens(engine, naive, prompts) == _greedy_tokens(engine, resident, prompts)
    stats = naive.stats
    assert stats.misses > 0 and stats.wait_seconds > 0
    assert stats.bytes_transferred == stats.misses * workload.expert_nbytes


def test_naive_offload_converts_stored_bf16_to_a_float32_compute_dtype(checkpoint_factory):
    from throughput_models import checkpoint_workload

    model_dir, _ = checkpoint_factory("qwen3_moe", dtype=torch.bfloat16)
    workload = checkpoint_workload(model_dir, CPU, torch.float32)  # like the embedded model: bf16 stored
    c = workload.config
    engine = LLMEngine(workload.model, None, CPU, max_model_len=64, max_num_seqs=4)
    resident = DenseExpertProvider(
        {layer: [type(w)(*(t.float() for t in (w.gate, w.up, w.down))) for w in weights]
         for layer, weights in workload.experts()}
    )
    host = host_copies(workload.experts(), pin=False)
    assert all(row.dtype == torch.bfloat16 for row in host.values())  # bf16 is what crosses the link
    naive = NaiveOffloadProvider(host, SlotPool(c.top_k, c.hidden_size, c.moe_intermediate_size, c.dtype, CPU))
    prompts = [[5, 9, 100, 31, 7]]
    assert _greedy_tokens(engine, naive, prompts) == _greedy_tokens(engine, resident, prompts)
    assert naive.stats.bytes_transferred == naive.stats.misses * workload.expert_nbytes // 2


def test_a_tiny_run_writes_every_configuration(tmp_path, checkpoint_factory, capsys):
    model_dir, _ = checkpoint_factory("qwen3_moe", dtype=torch.bfloat16)
    out = tmp_path / "results.json"
    throughput.main([
        "--device", "cpu", "--preset", "tiny", "--layers", "1", "--model", str(model_dir), "--prompt-len", "24",
        "--new-tokens", "2", "--budgets", "25%,50%,1%", "--batches", "1,2", "--out", str(out),
    ])
    results = json.loads(out.read_text())
    assert [w["name"] for w in results["workloads"]] == ["tiny", model_dir.name]
    for workload in results["workloads"]:
        configs = {(r["config"], r["budget"], r["batch"]) for r in workload["rows"]}
        expected = {("a resident", "all", b) for b in (1, 2)} | {
            (config, budget, b) for config in ("b naive", "c compressed", "d +prefetch")
            for budget in ("25%", "50%") for b in (1, 2)
        }
        assert configs == expected
        assert any("1%" in reason for reason in workload["skipped"])  # too small for one layer's top-k
        for r in workload["rows"]:
            assert r["tokens_per_s"] > 0 and r["ttft_s"] > 0
            if r["config"] != "a resident":
                assert 0 <= r["hit_rate"] <= 1
                assert r["bound_tokens_per_s"] is None or r["bound_tokens_per_s"] > 0
        assert workload["store_host_bytes"] < workload["naive_host_bytes"]  # compressed below bf16
    table = markdown_table(results)
    assert table.count("\n") == 1 + sum(len(w["rows"]) for w in results["workloads"])
    assert "(d)/(b)" in capsys.readouterr().out


def test_a_missing_embedded_model_is_one_clear_sentence(monkeypatch, tmp_path):
    import moeserve.assets

    monkeypatch.setattr(moeserve.assets, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--device", "cpu", "--preset", "tiny", "--layers", "1", "--out", str(tmp_path / "r.json")])
    message = str(exit_info.value)
    assert "embedded default model is missing" in message and "--model DIR" in message
    assert message.endswith(".") and "\n" not in message
