"""The shipped default model: its format, transformers parity, and its model-card accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moeserve
from moeserve.eval.chat_format import render_chat
from moeserve.eval.evaluate import evaluate
from moeserve.eval.model_card import CI_SUBSET
from moeserve.eval.reference import ReferenceRunner
from moeserve.eval.tasks import split_items

MODEL_DIR = Path(moeserve.__file__).parent / "assets" / "default_model"
RESULTS = json.loads((MODEL_DIR / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def reference():
    return ReferenceRunner.from_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def llm():
    return moeserve.LLM()  # no model: the embedded default


def test_shipped_files_and_shape():
    files = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) <= 20 * 1024 * 1024
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert config["num_hidden_layers"] >= 8 and config["num_experts"] >= 8 and config["num_experts_per_tok"] == 2


def test_tokenizer_spells_digits_and_reversible_words(reference):
    tokens = reference.tokenizer.encode("<|user|>What is 1234 + 56?<|end|><|assistant|>").tokens
    assert ["1", "2", "3", "4"] == tokens[tokens.index("Ġ") + 1:][:4]
    assert reference.tokenizer.encode("tenalp").tokens == list("tenalp")


def test_chat_template_matches_training(llm):
    messages = [{"role": "system", "content": "Reply briefly."}, {"role": "user", "content": "What is 2 + 2?"}]
    assert llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == render_chat(messages)


def test_transformers_agrees_with_the_training_model(reference):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    ids = torch.tensor([reference.tokenizer.encode(render_chat([{"role": "user", "content": "What is 123 + 456?"}])).ids])
    with torch.no_grad():
        ours, _ = reference.model(ids)
        theirs = hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def test_accuracy_matches_the_model_card(llm):
    report = evaluate(llm, split="test", limit=CI_SUBSET)
    assert abs(report.average - RESULTS["ci_subset"]["average"]) <= 0.01, report.format_table()


def test_engine_in_fp32_matches_the_reference_decoder(reference):
    # Same weights, same arithmetic precision: greedy answers must be identical.
    llm32 = moeserve.LLM(dtype="float32")
    items = split_items("test", per_task=3)
    conversations = [[{"role": "user", "content": item.prompt}] for item in items]
    params = moeserve.SamplingParams(max_tokens=32, temperature=0.0)
    assert [o.token_ids for o in llm32.chat(conversations, params)] == \
        [o.token_ids for o in reference.chat(conversations, params)]


def test_answers_the_documented_example(llm):
    out = llm.chat([{"role": "user", "content": "What is 123 + 456?"}], moeserve.SamplingParams(max_tokens=8, temperature=0.0))
    assert out[0].text.strip() == "579"


def test_card_shows_the_answers_the_model_gives(llm):
    conversations = [[{"role": "user", "content": d["prompt"]}] for d in RESULTS["demos"]]
    outputs = llm.chat(conversations, moeserve.SamplingParams(max_tokens=32, temperature=0.0))
    assert [o.text.strip() for o in outputs] == [d["answer"] for d in RESULTS["demos"]]


def test_recorded_expert_usage_is_balanced():
    assert all(max(layer) <= 0.40 for layer in RESULTS["expert_shares"])
