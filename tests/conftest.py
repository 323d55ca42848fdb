"""Shared fixtures: tiny random checkpoints written by transformers' own save_pretrained."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Before torch loads its OpenMP runtime, which reads this once. Early and side runs (tests/early_runs.py,
# tests/side_run.py) share the cores with this session, and an OpenMP thread that spins at a barrier while its
# partner waits for a core took tests 10-30x their time (a bench test 95 s against 3.5 s alone).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import side_run  # noqa: E402
import torch  # noqa: E402

# Decode steps run eagerly unless a test asks for compiled ones (LLM(enforce_eager=False)): compiling a
# step through inductor takes seconds per shape, and tests/test_compiled_decode.py checks that path.
os.environ.setdefault("MOESERVE_ENFORCE_EAGER", "1")

FAMILY_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        intermediate_size=40,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=24, clip_qkv=8.0, eos_token_id=None),
    # Layers alternate sliding (window 4, shorter than every generation) and full attention; YaRN rope
    # (transformers' default for gpt_oss); a SwiGLU limit the tiny model's activations cross. hidden and
    # intermediate sizes are multiples of 32, MXFP4's block.
    "gpt_oss": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        head_dim=8,
        sliding_window=4,
        swiglu_limit=1.0,
        swiglu_alpha=1.5,
        initializer_range=0.3,
    ),
    # MLA with q through q_lora_rank, YaRN; layer 0 dense; greedy softmax routing, two shared experts.
    "deepseek_v2": dict(
        initializer_range=0.1,  # sharper attention than the default 0.02, so a wrong softmax scale shows
        num_key_value_heads=4,  # transformers' MLA needs one K/V head per query head
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=40,
        n_shared_experts=2,
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        eos_token_id=None,
    ),
    # Moonlight's shape: one dense layer, a shared expert, sigmoid routing over 4 groups (2 chosen).
    "deepseek_v3": dict(
        initializer_range=0.1,  # sharper attention than the default 0.02, so a wrong softmax scale shows
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        n_routed_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        intermediate_size=40,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        eos_token_id=None,
    ),
    "glm4_moe": dict(
        initializer_range=0.1,  # sharper attention than the default 0.02, so a wrong softmax scale shows
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=40,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
        attention_bias=True,
        use_qk_norm=True,
        head_dim=12,
        eos_token_id=None,
    ),
}
VOCAB = 128
# Set by tests/test_exact_everywhere.py: run this whole session at another torch thread count. (torch
# caps OMP_NUM_THREADS at the core count; set_num_threads does not.)
if "MOESERVE_TEST_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["MOESERVE_TEST_THREADS"]))


def pytest_collection_finish(session):
    """Give a collected test module's `start_early()` its start now, before the first test runs (see
    tests/early_runs.py); its `stop_early()` runs when the session ends. Modules marked
    `RUN_BESIDE_THE_SESSION` go to a subprocess now (tests/side_run.py)."""
    if session.config.option.collectonly:
        return
    side_run.start(session)
    for module in {item.module for item in session.items if getattr(item, "module", None) is not None}:
        if hasattr(module, "start_early"):
            module.start_early()
            _early.append(module)


def pytest_sessionfinish(session):
    for module in _early:
        module.stop_early()
    side_run.stop()


def pytest_runtest_logreport(report):
    side_run.record(report)  # in a side run only


_early: list = []


def pytest_terminal_summary(terminalreporter):
    if "MOESERVE_TEST_THREADS" in os.environ:
        terminalreporter.write_line(f"torch threads: {torch.get_num_threads()}")


def make_hf_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(FAMILY_CONFIGS[model_type])
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random init gives routers near-uniform scores; a larger scale makes routing decisive, so
    # a wrong expert choice would show in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.shape[0] > 1:
                param.normal_(0, 0.5)
            if model_type == "gpt_oss" and name.endswith(("router.weight", "bias", "sinks")):
                # transformers starts gpt_oss's biases at zero and its sinks near zero: random values
                # make each of them (and a wrong use of any) show in the logits.
                param.normal_(0, 0.5)
        # DeepSeek-V3 / GLM start with a zero correction bias; a random one makes it change which
        # experts are chosen (but not their weights), as a trained one does.
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.2)
    return model


def write_tokenizer(directory: Path) -> None:
    """A small byte-level BPE tokenizer with a chat template, so text prompts work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|end|>", "<|user|>", "<|assistant|>"],
        # sorted: alphabet() is a set, and its first 100 in set order differ from run to run
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:100],
        show_progress=False,
    )
    tokenizer.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog. 0123456789"] * 20, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|end|>", "chat_template": template})
    )


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """checkpoint_factory(model_type, **options) → (directory, HF model), cached per options."""
    cache: dict[tuple, tuple[Path, object]] = {}

    def make(model_type: str, dtype=torch.float32, shard: bool = False, tokenizer: bool = False, **overrides):
        key = (model_type, str(dtype), shard, tokenizer, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            model = make_hf_model(model_type, **overrides).to(dtype)
            directory = tmp_path_factory.mktemp(f"{model_type}-ckpt")
            model.save_pretrained(directory, max_shard_size="20KB" if shard else "5GB")
            if tokenizer:
                write_tokenizer(directory)
            cache[key] = (directory, model)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def default_server(tmp_path_factory):
    """One `moeserve serve` process on the embedded default model, shared by the tests that talk to
    it from outside (lm-eval, huge inputs, the documentation's examples)."""
    from moeserve.assets import DEFAULT_MODEL_DIR
    from serve_process import ServeProcess

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the embedded default model is not installed")
    log = tmp_path_factory.mktemp("default-server") / "serve.log"
    with ServeProcess(env={"MOESERVE_CACHE_DIR": str(log.parent / "cache")}, log=log) as server:
        yield server
