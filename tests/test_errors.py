"""Every user error ends in one clear sentence (a MoeServeError), never a deep traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve import LLM, MoeServeError, SamplingParams
from moeserve.cli import main as cli_main


def _copy(directory, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(directory, target)
    return target


def _assert_one_sentence(exc: MoeServeError, *fragments: str):
    message = str(exc)
    assert "\n" not in message and message.endswith(".")
    for fragment in fragments:
        assert fragment in message, message


def test_missing_directory(tmp_path):
    with pytest.raises(MoeServeError) as exc:
        LLM(tmp_path / "nope", device="cpu")
    _assert_one_sentence(exc.value, "does not exist")


def test_directory_without_config(tmp_path):
    with pytest.raises(MoeServeError) as exc:
        LLM(tmp_path, device="cpu")
    _assert_one_sentence(exc.value, "config.json")


def test_unsupported_model_type_lists_supported(checkpoint_factory, tmp_path):
    target = _copy(checkpoint_factory("mixtral")[0], tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "llama"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoeServeError) as exc:
        LLM(target, device="cpu")
    _assert_one_sentence(exc.value, "'llama'", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def _rewrite_tensors(target, edit):
    path = target / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(checkpoint_factory, tmp_path):
    target = _copy(checkpoint_factory("qwen3_moe")[0], tmp_path)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    _rewrite_tensors(target, lambda t: t.pop(name))
    with pytest.raises(MoeServeError) as exc:
        LLM(target, device="cpu")
    _assert_one_sentence(exc.value, name, "missing")


def test_misshaped_tensor(checkpoint_factory, tmp_path):
    target = _copy(checkpoint_factory("qwen3_moe")[0], tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_tensors(target, lambda t: t.__setitem__(name, torch.zeros(3, 5)))
    with pytest.raises(MoeServeError) as exc:
        LLM(target, device="cpu")
    _assert_one_sentence(exc.value, name, "[3, 5]")


def test_truncated_safetensors(checkpoint_factory, tmp_path):
    target = _copy(checkpoint_factory("olmoe")[0], tmp_path)
    path = target / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MoeServeError) as exc:
        LLM(target, device="cpu")
    _assert_one_sentence(exc.value, "truncated")


@pytest.fixture(scope="module")
def llm(checkpoint_factory):
    return LLM(checkpoint_factory("qwen3_moe", tokenizer=True)[0], device="cpu", max_model_len=64)


def test_prompt_longer_than_context(llm):
    with pytest.raises(MoeServeError) as exc:
        llm.generate([[1] * 64])
    _assert_one_sentence(exc.value, "64 tokens", "context")
    with pytest.raises(MoeServeError):
        llm.score([1] * 65)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3"])
def test_max_tokens_below_one(bad):
    with pytest.raises(MoeServeError) as exc:
        SamplingParams(max_tokens=bad)
    _assert_one_sentence(exc.value, "max_tokens")


def test_unknown_sampling_option_names_it():
    with pytest.raises(MoeServeError) as exc:
        SamplingParams(max_tokens=4, tempreature=0.5)
    _assert_one_sentence(exc.value, "'tempreature'", "temperature")


@pytest.mark.parametrize(
    "options,name",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"), ({"seed": "x"}, "seed"), ({"stop": [""]}, "stop")],
)
def test_invalid_sampling_values(options, name):
    with pytest.raises(MoeServeError) as exc:
        SamplingParams(**options)
    _assert_one_sentence(exc.value, name)


def test_bad_prompts(llm):
    for prompt, fragment in [([], "no prompts"), ([[]], "empty"), ([1, 10**6], "vocabulary"), ([[1, 2], 3.5], "prompt")]:
        with pytest.raises(MoeServeError) as exc:
            llm.generate(prompt)
        assert fragment in str(exc.value)


def test_failed_batch_leaves_engine_clean(llm):
    with pytest.raises(MoeServeError):
        llm.generate([[1, 2, 3], [1] * 100])
    assert not llm.engine.has_unfinished()
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0))[0].token_ids


def test_text_prompt_without_tokenizer(checkpoint_factory):
    ids_only = LLM(checkpoint_factory("mixtral")[0], device="cpu")
    with pytest.raises(MoeServeError) as exc:
        ids_only.generate(["hello"])
    _assert_one_sentence(exc.value, "tokenizer.json")


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert cli_main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
