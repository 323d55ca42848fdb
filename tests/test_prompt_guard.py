"""The prompt guard's bound: a text of n characters has at least ceil(n / chars_per_token) tokens,
checked against the tokenizer itself on arbitrary text; tokenizers for which the argument does not
hold get no bound."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from moeserve.assets import DEFAULT_MODEL_DIR
from moeserve.server.errors import ApiError
from moeserve.server.prompt_guard import PromptGuard, chars_per_token_bound
from moeserve.tokenizer import Tokenizer, load_tokenizer

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no embedded model")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(DEFAULT_MODEL_DIR)


def test_the_embedded_tokenizer_covers_at_most_13_characters_per_token(tokenizer):
    assert chars_per_token_bound(tokenizer) == 13


texts = st.text(max_size=300) | st.text(alphabet="abcXYZ <|>end0123456789'", max_size=600) | st.sampled_from(
    ["<|assistant|>" * 20, "Gleisdaim Brugous " * 10, "\U0001f600" * 50]
)


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_no_text_has_fewer_tokens_than_the_bound(tokenizer, text):
    bound = chars_per_token_bound(tokenizer)
    assert len(tokenizer.encode(text, add_special_tokens=False)) >= math.ceil(len(text) / bound)


def test_guard_refuses_only_what_cannot_fit(tokenizer):
    guard = PromptGuard(tokenizer, max_model_len=256)
    guard.check_prompt("<|assistant|>" * 255, "prompt")  # 255 tokens of 13 characters: fits exactly
    with pytest.raises(ApiError) as refused:
        guard.check_prompt("x" * (13 * 255 + 1), "prompt")
    assert refused.value.status == 400 and refused.value.param == "prompt"


def _backend(model, pre_tokenizer=None, normalizer=None) -> Tokenizer:
    backend = HfTokenizer(model)
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        backend.normalizer = normalizer
    return Tokenizer(backend, {}, None)


def test_no_bound_where_characters_could_vanish():
    vocab = {"a": 0, "b": 1, "[UNK]": 2}
    whitespace = _backend(models.BPE(vocab, [], unk_token="[UNK]"), pre_tokenizers.Whitespace())
    assert chars_per_token_bound(whitespace) is None  # spaces are dropped
    fused = _backend(models.BPE(vocab, [], unk_token="[UNK]", fuse_unk=True))
    assert chars_per_token_bound(fused) is None  # a run of unknown characters is one token
    no_unk = _backend(models.BPE(vocab, []))
    assert chars_per_token_bound(no_unk) is None  # unknown characters are dropped
    partial_bytes = _backend(models.BPE(vocab, []), pre_tokenizers.ByteLevel())
    assert chars_per_token_bound(partial_bytes) is None  # bytes the vocabulary cannot spell
    assert chars_per_token_bound(_backend(models.WordPiece({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))) is None


def test_a_normalized_text_is_measured_after_normalization():
    vocab = {"a": 0, "b": 1, "[UNK]": 2}
    strip = _backend(models.BPE(vocab, [], unk_token="[UNK]"), normalizer=normalizers.Replace(" ", ""))
    guard = PromptGuard(strip, max_model_len=8)
    assert guard.chars_per_token == 5
    guard.check_prompt("a" + " " * 1000, "prompt")  # 1 character once normalized
    with pytest.raises(ApiError):
        guard.check_prompt("a" * 36, "prompt")
