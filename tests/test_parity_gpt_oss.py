"""gpt_oss parity with transformers: sinks, sliding/full alternation, YaRN, biased routers and experts,
the clamped SwiGLU; fp32 logits and greedy tokens, and bf16 under the bf16 rule."""

from __future__ import annotations

import math

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.config import parse_model_config
from moeserve.errors import ModelLoadError
from parity_checks import assert_bf16_matches, hf_greedy, hf_logits

PROMPTS = [[5, 6, 7], [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 11], [1, 2], [42] * 6]
SCORE_IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
CASES = [
    {},  # YaRN (truncate off), sliding window 4 on even layers, full attention on odd ones, top-2
    {  # plain rope, its own layer types, top-3 (the sum over slots no longer commutes), no GQA
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
        "num_experts_per_tok": 3,
        "num_key_value_heads": 4,
    },
    {  # no attention biases, window 2, YaRN with truncation and its own factor
        "attention_bias": False,
        "sliding_window": 2,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "beta_fast": 8.0, "beta_slow": 2.0,
            "original_max_position_embeddings": 64, "truncate": True,
        },
    },  # fmt: skip
]


def test_config_reads_gpt_oss_switches(checkpoint_factory):
    directory, hf = checkpoint_factory("gpt_oss")
    config = LLM(directory, device="cpu").config
    assert config.sliding_windows == (4, None, 4)
    assert config.attention_sinks and config.attention_output_bias and config.router.kind == "biased_topk_softmax"
    assert config.moe_layer_ids == [0, 1, 2]
    assert (config.swiglu_alpha, config.swiglu_limit) == (1.5, 1.0)
    assert config.rope.kind == "yarn" and config.rope.factor == 32.0 and not config.rope.truncate
    assert config.expert_quantization is None
    assert all(layer.self_attn.sinks.abs().min() > 0 for layer in hf.model.layers)


@pytest.mark.parametrize("overrides", CASES, ids=["yarn-alternating", "default-rope-top3", "no-bias-yarn-truncate"])
def test_score_and_greedy_match_transformers(checkpoint_factory, overrides):
    directory, hf_model = checkpoint_factory("gpt_oss", **overrides)
    llm = LLM(directory, device="cpu")
    ours = llm.score(SCORE_IDS)
    assert ours.dtype == torch.float32 and ours.shape == (len(SCORE_IDS), hf_model.config.vocab_size)
    assert (ours - hf_logits(hf_model, SCORE_IDS)).abs().max().item() <= 1e-4

    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf_model, prompt, 32)[0]


def test_prefill_in_chunks_matches_transformers(checkpoint_factory):
    # Extending a cached sequence (the sliding window then reaches back into the cache) against one pass.
    directory, hf_model = checkpoint_factory("gpt_oss")
    llm = LLM(directory, device="cpu")
    runner = llm.engine.runner
    seq = llm.engine.make_sequence(SCORE_IDS, SamplingParams(max_tokens=1))
    logits, done = [], 0
    for n in (5, 1, 7):
        seq.prompt_ids = SCORE_IDS[: done + n]  # the sequence grows by n tokens; the runner computes only those
        (rows,) = runner.extend([seq], [True], llm.experts)
        logits.append(rows)
        done += n
    assert (torch.cat(logits) - hf_logits(hf_model, SCORE_IDS)).abs().max().item() <= 1e-4


def test_bf16_checkpoint_matches_under_the_bf16_rule(checkpoint_factory):
    from transformers import AutoModelForCausalLM

    directory, _ = checkpoint_factory("gpt_oss", dtype=torch.bfloat16)
    # The reference loads the checkpoint as a user would: a model cast with .to(bfloat16) would also
    # round its rotary inv_freq buffer to bf16, which no loaded model does.
    hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    llm = LLM(directory, device="cpu")
    assert_bf16_matches(llm, hf_model, SCORE_IDS, PROMPTS[:2])


def test_other_quantization_methods_fail_with_one_sentence():
    raw = {
        "model_type": "gpt_oss", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
    }  # fmt: skip
    for method in ("fp8", "awq", None):
        with pytest.raises(ModelLoadError) as exc:
            parse_model_config({**raw, "quantization_config": {"quant_method": method}})
        message = str(exc.value)
        assert f"quantization method {method!r} is not supported" in message and message.endswith(".")
        assert "\n" not in message
    with pytest.raises(ModelLoadError, match="MXFP4 gpt_oss experts only"):
        parse_model_config({**raw, "model_type": "mixtral", "quantization_config": {"quant_method": "mxfp4"}})
    assert parse_model_config({**raw, "quantization_config": {"quant_method": "mxfp4"}}).expert_quantization == "mxfp4"


def test_gpt_oss_20b_config_json_is_understood():
    # The keys of the published gpt-oss-20b config.json (legacy rope_scaling, no layer_types, MXFP4).
    raw = {
        "model_type": "gpt_oss", "hidden_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088, "intermediate_size": 2880,
        "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4, "sliding_window": 128,
        "rope_theta": 150000, "max_position_embeddings": 131072, "swiglu_limit": 7.0, "attention_bias": True,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]},
        "torch_dtype": "bfloat16", "eos_token_id": 200002,
    }  # fmt: skip
    config = parse_model_config(raw)
    assert config.sliding_windows == (128, None) * 12
    assert config.rope.theta == 150000 and config.rope.kind == "yarn" and config.rope.factor == 32
    assert not config.rope.truncate and config.rope.original_max_position_embeddings == 4096
    assert config.rope.attention_factor == pytest.approx(0.1 * math.log(32) + 1)
    assert (config.num_experts, config.top_k, config.moe_intermediate_size) == (32, 4, 2880)
    assert config.expert_quantization == "mxfp4" and config.dtype == torch.bfloat16
    assert (config.swiglu_alpha, config.swiglu_limit) == (1.702, 7.0)
