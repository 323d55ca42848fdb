"""deepseek_v2, deepseek_v3 and glm4_moe under the offloading runtime, the MLA KV cache, `moeserve
bench` on a Moonlight-shaped checkpoint, and what these families refuse to load."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from moeserve import LLM, MoeServeError, SamplingParams
from moeserve.cli import main
from moeserve.offload.cache import SlotPool
from moeserve.offload.policy_resolve import split_groups

PROMPTS = [[5, 6, 7], [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 11], list(range(30, 50))]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
RAW = {"default": {"codec": "raw"}}
LOSSY = {"default": {"codec": "szp", "mode": "rel", "error_bound": 1e-2}, "rules": [{"layers": "deep", "codec": "int8"}]}
FAMILIES = ["deepseek_v2", "deepseek_v3", "glm4_moe"]


@pytest.fixture(autouse=True)
def store_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path / "cache"))


def _checkpoint(checkpoint_factory, model_type: str):
    # 4 layers, the first dense: 3 MoE layers, one per policy group.
    return checkpoint_factory(model_type, num_hidden_layers=4, seed=7)[0]


def _run(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)], llm.score(PROMPTS[1])


def _slot_bytes(llm) -> int:
    c = llm.config
    return SlotPool.slot_nbytes(c.hidden_size, c.moe_intermediate_size, c.dtype)


@pytest.mark.exact
@pytest.mark.parametrize("model_type", FAMILIES)
def test_raw_policy_is_bit_identical_to_resident_under_small_budgets(checkpoint_factory, model_type):
    directory = _checkpoint(checkpoint_factory, model_type)
    tokens, logits = _run(LLM(directory, device="cpu"))
    probe = LLM(directory, device="cpu", policy=RAW, progress=False)
    minimum = probe.config.top_k * _slot_bytes(probe)  # one layer's top-k
    for budget in (minimum, minimum + _slot_bytes(probe), "50%"):
        got_tokens, got_logits = _run(LLM(directory, device="cpu", policy=RAW, expert_cache=budget, progress=False))
        assert got_tokens == tokens, budget
        assert torch.equal(got_logits, logits), budget


@pytest.mark.exact
@pytest.mark.parametrize("model_type", FAMILIES)
def test_lossy_policy_is_identical_under_every_budget(checkpoint_factory, model_type):
    directory = _checkpoint(checkpoint_factory, model_type)
    unlimited = LLM(directory, device="cpu", policy=LOSSY, progress=False)
    tokens, logits = _run(unlimited)
    minimum = unlimited.config.top_k * _slot_bytes(unlimited)
    for budget in (minimum, minimum + _slot_bytes(unlimited), "25%"):
        got_tokens, got_logits = _run(LLM(directory, device="cpu", policy=LOSSY, expert_cache=budget, progress=False))
        assert got_tokens == tokens and torch.equal(got_logits, logits), budget


@pytest.mark.parametrize("model_type", FAMILIES)
def test_only_routed_experts_are_offloaded_and_groups_span_moe_layers(checkpoint_factory, model_type):
    llm = LLM(_checkpoint(checkpoint_factory, model_type), device="cpu", policy=LOSSY, progress=False)
    config = llm.config
    assert config.moe_layer_ids == [1, 2, 3]  # layer 0 is dense (first_k_dense_replace=1)
    assert dict(llm.offload.policy.groups) == split_groups([1, 2, 3]) == {"shallow": (1,), "middle": (2,), "deep": (3,)}
    assert sorted({layer for layer, _ in llm.offload.store.experts}) == [1, 2, 3]
    assert len(llm.offload.store.experts) == 3 * config.num_experts
    # The dense MLP and the shared experts are resident parameters of the model.
    resident = dict(llm.model.named_parameters())
    assert "model.layers.0.mlp.down_proj.weight" in resident
    assert all(f"model.layers.{i}.mlp.shared_experts.down_proj.weight" in resident for i in (1, 2, 3))
    assert not any(".experts." in name and "shared" not in name for name in resident)


@pytest.mark.exact
def test_compressed_directory_serves_the_same_outputs(checkpoint_factory, tmp_path):
    import yaml

    directory = _checkpoint(checkpoint_factory, "deepseek_v3")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(LOSSY))
    out = tmp_path / "compressed"
    assert main(["compress", "--model", str(directory), "--policy", str(policy), "--out", str(out)]) == 0
    served = LLM(out, device="cpu", expert_cache="25%", progress=False)
    tokens, logits = _run(LLM(directory, device="cpu", policy=LOSSY, progress=False))
    got_tokens, got_logits = _run(served)
    assert got_tokens == tokens and torch.equal(got_logits, logits)


def test_mla_kv_cache_holds_only_the_latent(checkpoint_factory):
    llm = LLM(_checkpoint(checkpoint_factory, "deepseek_v3"), device="cpu")
    config, mla = llm.config, llm.config.mla
    latent = mla.kv_lora_rank + mla.qk_rope_head_dim  # 12 + 4
    assert config.kv_bytes_per_token == 4 * latent * 4  # 4 layers, float32
    # expanded, each of the 4 heads would cache a (8 + 4)-value key and a 6-value value per layer
    assert config.full_kv_bytes_per_token == 4 * 4 * (12 + 6) * 4
    llm.generate(PROMPTS, GREEDY)
    cache = llm.engine.runner.cache
    assert cache.v == [] and len(cache.k) == 4
    blocks, block_size, heads, width = cache.k[0].shape  # one pool tensor per layer: a single layer group
    assert (heads, width) == (1, latent)
    assert cache.bytes_per_token == config.kv_bytes_per_token
    assert cache.nbytes == blocks * block_size * config.kv_bytes_per_token


def test_grouped_query_kv_cache_is_unchanged(checkpoint_factory):
    llm = LLM(_checkpoint(checkpoint_factory, "glm4_moe"), device="cpu")
    config = llm.config
    assert config.mla is None
    assert config.kv_bytes_per_token == config.full_kv_bytes_per_token == 4 * 2 * 2 * config.head_dim * 4
    llm.generate(PROMPTS[:1], GREEDY)
    cache = llm.engine.runner.cache
    assert len(cache.v) == 4 and cache.bytes_per_token == config.kv_bytes_per_token


def test_policy_show_reports_kv_bytes_next_to_the_expanded_layout(checkpoint_factory, tmp_path, capsys):
    policy = tmp_path / "policy.yaml"
    policy.write_text("default: {codec: int8}\n")
    directory = _checkpoint(checkpoint_factory, "deepseek_v3")
    assert main(["policy", "show", "--model", str(directory), "--device", "cpu", str(policy)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "KV cache: 256 bytes/token (MLA latent; expanded per-head K/V would need 1152)"


def test_bench_runs_on_a_moonlight_shaped_checkpoint(checkpoint_factory, tmp_path, capsys):
    directory, _ = checkpoint_factory("deepseek_v3", tokenizer=True, num_hidden_layers=4, seed=7)
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(directory), "--device", "cpu", "--codecs", "int8", "--layers", "all,shallow,deep",
            "--tasks", "add", "--limit", "2", "--quality-items", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["codec"] == "none"
    by_group = {r["layers"]: r["layer_ids"] for r in rows[1:]}
    assert by_group == {"all": [1, 2, 3], "shallow": [1], "deep": [3]}


def test_mtp_layers_are_ignored_with_one_line(checkpoint_factory, caplog):
    directory, _ = checkpoint_factory("deepseek_v3")
    assert json.loads((directory / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with caplog.at_level(logging.WARNING):
        LLM(directory, device="cpu")
    lines = [r.getMessage() for r in caplog.records if "num_nextn_predict_layers" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "deepseek_v32"}, "DeepSeek-V3.2's sparse attention"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, "quant_method 'fp8'"),
        ({"topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"),
        ({"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1}, "n_group=3 must divide"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope'"),
    ],
)
def test_unsupported_variants_fail_at_load_with_one_sentence(checkpoint_factory, tmp_path, change, message):
    source, _ = checkpoint_factory("deepseek_v2")
    config = {**json.loads((source / "config.json").read_text()), **change}
    for f in source.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoeServeError) as info:
        LLM(tmp_path, device="cpu")
    text = str(info.value)
    assert message in text and "\n" not in text and text.endswith(".")


def test_server_serves_an_offloaded_deepseek_v3(checkpoint_factory):
    import openai

    from moeserve.server import ServerConfig, create_app
    from moeserve.server.background import BackgroundServer

    directory, _ = checkpoint_factory("deepseek_v3", tokenizer=True, num_hidden_layers=4, seed=7)
    llm = LLM(directory, device="cpu", policy=LOSSY, expert_cache="25%", progress=False)
    prompt = "the quick brown fox"
    expected = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].text
    with BackgroundServer(create_app(llm, ServerConfig(model_name="tiny"))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected
