"""Parity with transformers: logits and greedy tokens of tiny random checkpoints of every family."""

from __future__ import annotations

import pytest
import torch

from moeserve import LLM, SamplingParams
from parity_checks import assert_bf16_matches, assert_fp32_matches, hf_greedy, hf_logits

FAMILY_CASES = [
    ("mixtral", {}),
    ("qwen2_moe", {}),  # shared expert + a dense layer (mlp_only_layers=[1])
    ("qwen2_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [], "norm_topk_prob": True}),
    ("qwen3_moe", {}),  # norm_topk_prob true
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("olmoe", {}),  # full-width q/k norm and clip_qkv
    ("mixtral", {"sliding_window": 5}),
]
PROMPTS = [[5, 6, 7], [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 11], [1, 2], [42] * 6]
SCORE_IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]


@pytest.mark.parametrize("model_type,overrides", FAMILY_CASES, ids=lambda v: str(v))
def test_score_and_greedy_match_transformers(checkpoint_factory, model_type, overrides):
    directory, hf_model = checkpoint_factory(model_type, **overrides)
    assert_fp32_matches(LLM(directory, device="cpu"), hf_model, SCORE_IDS, PROMPTS)


def test_sharded_checkpoint_matches(checkpoint_factory):
    directory, hf_model = checkpoint_factory("qwen3_moe", shard=True)
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 1
    llm = LLM(directory, device="cpu")
    assert (llm.score(SCORE_IDS) - hf_logits(hf_model, SCORE_IDS)).abs().max().item() <= 1e-4
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf_model, prompt, 32)[0]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_bf16_checkpoint_matches_within_bf16_tolerance(checkpoint_factory, model_type):
    directory, hf_model = checkpoint_factory(model_type, dtype=torch.bfloat16)
    llm = LLM(directory, device="cpu")
    assert_bf16_matches(llm, hf_model, SCORE_IDS, PROMPTS)


def test_bf16_checkpoint_upcast_to_fp32_matches_fp32_reference(checkpoint_factory):
    directory, hf_model = checkpoint_factory("qwen3_moe", dtype=torch.bfloat16)
    llm = LLM(directory, device="cpu", dtype="float32")
    ref = hf_logits(hf_model.float(), SCORE_IDS)
    hf_model.to(torch.bfloat16)
    assert (llm.score(SCORE_IDS) - ref).abs().max().item() <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_cuda_matches_cpu(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe")
    cpu = LLM(directory, device="cpu")
    gpu = LLM(directory, device="cuda", dtype="float32")
    assert (cpu.score(SCORE_IDS) - gpu.score(SCORE_IDS)).abs().max().item() <= 1e-3
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in cpu.generate(PROMPTS, params)] == [o.token_ids for o in gpu.generate(PROMPTS, params)]
