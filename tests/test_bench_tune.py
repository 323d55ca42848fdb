"""`moeserve bench` and `moeserve tune` machinery on a tiny random model (accuracy there is meaningless;
what is checked is that every configuration perturbs what it says, measures honestly, and resumes)."""

from __future__ import annotations

import json

import pytest
import torch

from moeserve import LLM
from moeserve.cli import main
from moeserve.eval import bench as bench_module
from moeserve.eval.bench import BenchError, BenchOptions, layer_groups, run_bench
from moeserve.eval.evaluate import EvalReport, TaskScore
from moeserve.eval.perturb import GAUSSIAN, ExpertPerturber, Perturbation
from moeserve.eval.tune import Measured, TuneOptions, TuneResult, budget_warnings, knapsack, paired_drop, policy_yaml
from moeserve.offload.policy import load_policy

SMALL = dict(tasks=("add", "sort"), limit=2, quality_items=2)


@pytest.fixture(scope="module")
def llm(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True, num_hidden_layers=3)
    return LLM(str(directory), device="cpu", progress=False)


def test_perturber_round_trips_within_the_bound_and_leaves_other_experts(llm):
    perturber = ExpertPerturber(llm)
    provider, stats = perturber.provider(Perturbation("szp", "rel", 1e-2), [(0, 1)])
    assert 0 < stats.max_error_over_bound <= 1.0
    assert stats.values == sum(t.numel() for t in (perturber.stored[0][1].gate, perturber.stored[0][1].up, perturber.stored[0][1].down))
    assert stats.bits_per_value < 16
    changed = provider.expert(0, 1)
    assert not torch.equal(changed.gate, llm.experts.expert(0, 1).gate)
    assert provider.expert(0, 0) is llm.experts.expert(0, 0)  # shared, untouched
    assert provider.expert(1, 1) is llm.experts.expert(1, 1)


def test_gaussian_noise_has_the_bound_as_its_standard_deviation(llm):
    perturber = ExpertPerturber(llm)
    pairs = [(layer, e) for layer in llm.config.moe_layer_ids for e in range(llm.config.num_experts)]
    provider, stats = perturber.provider(Perturbation(GAUSSIAN, "abs", 1e-2), pairs)
    diffs = torch.cat([(provider.expert(*p).up - llm.experts.expert(*p).up).flatten() for p in pairs])
    assert diffs.std().item() == pytest.approx(1e-2, rel=0.05)
    assert stats.compressed_bytes is None and stats.max_error_over_bound > 1.0  # unbounded, unlike a codec


def test_layer_groups_resolve_thirds_ids_and_ranges():
    layers = list(range(8))
    groups = layer_groups(("all", "shallow", "middle", "deep", "2-4", "7"), layers)
    assert groups["shallow"] == (0, 1, 2) and groups["middle"] == (3, 4, 5) and groups["deep"] == (6, 7)
    assert groups["2-4"] == (2, 3, 4) and groups["7"] == (7,) and groups["all"] == tuple(layers)
    with pytest.raises(BenchError, match="holds no MoE layer"):
        layer_groups(("9-12",), layers)
    with pytest.raises(BenchError, match="not understood"):
        layer_groups(("top",), layers)


def test_bench_options_refuse_bad_input_in_one_sentence():
    with pytest.raises(BenchError, match="--codecs names 'lz4'"):
        BenchOptions(codecs=("lz4",))
    with pytest.raises(BenchError, match="most-used:K"):
        BenchOptions(experts="top:2")
    with pytest.raises(BenchError, match="--modes"):
        BenchOptions(modes=("relative",))
    with pytest.raises(BenchError, match="--quality-items"):
        BenchOptions(quality_items=0)


def test_bench_writes_rows_report_and_plots_and_resumes(llm, tmp_path, monkeypatch):
    options = BenchOptions(codecs=("szp", "int8"), error_bounds=(1e-3, 1e-1), layers=("all", "deep"),
                           simulate=GAUSSIAN, **SMALL)
    rows = run_bench(llm, options, tmp_path, progress=False)
    # baseline + (2 szp bounds + int8 + 2 gaussian bounds) x 2 groups
    assert len(rows) == 1 + 5 * 2
    base = rows[0]
    assert base["codec"] == "none" and base["kl"] == 0 and base["top1_agreement"] == 1
    szp = [r for r in rows if r["codec"] == "szp"]
    assert all(0 < r["max_error_over_bound"] <= 1 for r in szp)
    loose_all = next(r for r in szp if r["error_bound"] == 1e-1 and r["layers"] == "all")
    tight_all = next(r for r in szp if r["error_bound"] == 1e-3 and r["layers"] == "all")
    assert loose_all["bits_per_value"] < tight_all["bits_per_value"]
    assert loose_all["kl"] > tight_all["kl"] >= 0
    deep = next(r for r in szp if r["error_bound"] == 1e-1 and r["layers"] == "deep")
    assert deep["layer_ids"] == [2] and deep["values"] * 3 == loose_all["values"]
    int8 = next(r for r in rows if r["codec"] == "int8" and r["layers"] == "all")
    assert 8 <= int8["bits_per_value"] < 9.5 and int8["error_bound"] is None
    report = (tmp_path / "report.md").read_text()
    assert report.index("Uncompressed baseline") < report.index("szp, mode rel")
    for png in ("accuracy_vs_bound.png", "accuracy_vs_bits.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    calls = []
    monkeypatch.setattr(bench_module, "evaluate", lambda *a, **k: calls.append(1))
    again = run_bench(llm, options, tmp_path, progress=False)
    assert calls == [] and [r["id"] for r in again] == [r["id"] for r in rows]
    with pytest.raises(BenchError, match="another items_per_task"):
        run_bench(llm, BenchOptions(**{**SMALL, "limit": 3}), tmp_path, progress=False)


def test_bench_most_used_perturbs_only_k_experts_per_layer(llm, tmp_path):
    options = BenchOptions(codecs=("int8",), layers=("all",), experts="most-used:1", **SMALL)
    rows = run_bench(llm, options, tmp_path, progress=False)
    perturber = ExpertPerturber(llm)
    per_expert = perturber.stored[0][0].nbytes // 4  # float32 checkpoint: values per expert
    assert rows[1]["values"] == per_expert * len(llm.config.moe_layer_ids)


def test_bench_cli_reports_a_bad_option_as_one_line(capsys, tmp_path):
    assert main(["bench", "--codecs", "szp,lz4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --codecs names 'lz4'") and "\n" not in err


def test_knapsack_finds_the_smallest_assignment_within_the_cost():
    cost = {0: [0.0, 0.001, 0.01], 1: [0.0, 0.0, 0.02], 2: [0.0, 0.004, float("inf")]}
    size = {0: [100, 50, 20], 1: [100, 40, 10], 2: [100, 60, 30]}
    import itertools

    for tau in (0.0, 0.004, 0.012, 0.02, 0.04):
        choice = knapsack(cost, size, tau)
        assert sum(cost[layer][r] for layer, r in choice.items()) <= tau
        best = min(sum(size[layer][r] for layer, r in enumerate(rs))
                   for rs in itertools.product(range(3), repeat=3)
                   if sum(cost[layer][r] for layer, r in enumerate(rs)) <= tau * 0.99)  # DP rounds costs up
        assert sum(size[layer][r] for layer, r in choice.items()) <= best
    assert knapsack(cost, size, 0.0) == {0: 0, 1: 1, 2: 0}


def _report(outcomes: dict[str, list[bool]]) -> EvalReport:
    report = EvalReport("test", {t: TaskScore(sum(o), len(o)) for t, o in outcomes.items()})
    report.outcomes = outcomes
    return report


def test_paired_drop_counts_only_flipped_items():
    base = _report({"a": [True] * 10, "b": [True, False] * 5})
    same = paired_drop(base, base)
    assert same.drop == 0 and same.drop_se == 0
    worse = paired_drop(base, _report({"a": [False] + [True] * 9, "b": [True, False] * 5}))
    assert worse.drop == pytest.approx(0.05) and worse.drop_se > 0


def test_tuned_policy_yaml_loads_and_resolves_to_the_chosen_rungs():
    options = TuneOptions(ladder=(1e-3, 1e-2))
    rungs = options.rungs()
    layers = [0, 1, 2, 3]
    result = TuneResult(options, layers, rungs, {0: 2, 1: 1, 2: 0, 3: 2}, 1,
                        {layer: [400, 150, 100] for layer in layers}, {}, 4 * 100, {"validation": 0.9, "test": 0.88})
    m = Measured(0.87, 0.01, 0.004)
    result.tuned = result.uniform = {"validation": m, "test": m}
    text = policy_yaml(result, "tiny")
    assert text.startswith("# moeserve tune for tiny") and "bits/value" in text
    resolved = load_policy(text).resolve(layers, 4, 2)
    assert resolved.setting(0, 1, "down").error_bound == 1e-2
    assert resolved.setting(1, 0, "gate").error_bound == 1e-3
    assert resolved.setting(2, 1, "up").codec == "raw"
    assert resolved.setting(3, 0, "gate").codec == "szp"


def _tuned(held_out: Measured, budget: float = 0.05) -> TuneResult:
    options = TuneOptions(max_accuracy_drop=budget, ladder=(1e-3, 1e-2))
    layers = [0, 1]
    result = TuneResult(options, layers, options.rungs(), {0: 1, 1: 2}, 1, {layer: [400, 150, 100] for layer in layers},
                        {}, 2 * 100, {"validation": 0.9, "test": 0.9})
    result.tuned = result.uniform = {"validation": Measured(0.9, 0.0, 0.0), "test": held_out}
    return result


def test_tune_warns_when_the_held_out_check_breaks_the_budget(tmp_path):
    """Issue 26: +10 ± 14 points (2 SE) held out against a 5-point budget was written without a word."""
    result = _tuned(Measured(0.80, 0.10, 0.07))
    warnings = budget_warnings(result)
    assert len(warnings) == 2
    assert warnings[0].startswith("the held-out accuracy drop of 10.00 points exceeds the budget of 5 points;")
    assert warnings[1].startswith("the held-out drop's standard error of 7.00 points exceeds the budget of 5 points")
    text = policy_yaml(result, "tiny")
    assert [line for line in text.splitlines() if line.startswith("# WARNING: ")] == [f"# WARNING: {w}" for w in warnings]
    path = tmp_path / "tuned.yaml"
    path.write_text(text)
    assert load_policy(path) == load_policy(text)  # read back as any --policy file: the warnings are comments
    assert budget_warnings(_tuned(Measured(0.89, 0.01, 0.004))) == []
    assert budget_warnings(_tuned(Measured(0.80, 0.02, 0.06)))[0].startswith("the held-out drop's standard error")


def test_tune_strict_exits_non_zero_on_a_warning(tmp_path, monkeypatch, capsys):
    from moeserve.cli import main
    from moeserve.eval import tune

    held_out = {"breaks": Measured(0.80, 0.10, 0.07), "keeps": Measured(0.89, 0.01, 0.004)}
    for name, measured in held_out.items():
        monkeypatch.setattr(tune.Tuner, "run", lambda self, measured=measured: _tuned(measured))
        for strict in ([], ["--strict"]):
            out = tmp_path / f"{name}.yaml"
            code = main(["tune", "--max-accuracy-drop", "0.05", "--out", str(out), "--quiet", *strict])
            captured = capsys.readouterr()
            assert code == (1 if strict and name == "breaks" else 0)
            assert captured.err.count("warning: the held-out") == (2 if name == "breaks" else 0)
            assert "WARNING" not in captured.out and f"wrote {out}" in captured.out and out.is_file()


def test_tune_options_refuse_unbounded_codec():
    from moeserve.eval.tune import TuneError

    with pytest.raises(TuneError, match="not an error-bounded codec"):
        TuneOptions(codec="int8")
    with pytest.raises(TuneError, match="not an error-bounded codec"):
        TuneOptions(codec="lz4")
    with pytest.raises(TuneError, match="fraction"):
        TuneOptions(max_accuracy_drop=1.0)


def test_results_json_is_valid_after_every_row(llm, tmp_path, monkeypatch):
    seen = []
    original = bench_module._save_rows

    def spy(out_dir, header, rows):
        original(out_dir, header, rows)
        seen.append(len(json.loads((out_dir / "results.json").read_text())["rows"]))

    monkeypatch.setattr(bench_module, "_save_rows", spy)
    run_bench(llm, BenchOptions(codecs=("int4",), layers=("all",), **SMALL), tmp_path, progress=False)
    assert seen == [1, 2]
