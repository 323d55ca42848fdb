"""Tokenizer wrapper: incremental detokenization and chat templates."""

from __future__ import annotations

import json
import random

import pytest

from moeserve import MoeServeError
from moeserve.tokenizer import IncrementalDetokenizer, load_tokenizer

from conftest import write_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer(directory)
    return load_tokenizer(directory)


def test_incremental_text_equals_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(tokenizer)
        pieces = []
        for n, token in enumerate(ids, start=1):
            pieces.append(detok.add(token))
            # Only an incomplete trailing character may be held back, nothing before it.
            assert detok.text == tokenizer.decode(ids[:n]).rstrip("\ufffd")
        pieces.append(detok.flush())
        assert "".join(pieces) == detok.text == tokenizer.decode(ids)


def test_incremental_text_of_real_words(tokenizer):
    ids = tokenizer.encode("the quick brown fox jumps")
    detok = IncrementalDetokenizer(tokenizer)
    seen = []
    for token in ids:
        detok.add(token)
        seen.append(detok.text)
    assert detok.text == "the quick brown fox jumps"
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:]))


def test_chat_template_with_system_message(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == "<|system|>be brief<|end|><|user|>hi<|end|><|assistant|>"
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith("hi<|end|>")


def test_template_errors_are_user_errors(tmp_path):
    write_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(MoeServeError, match="first message must be from the user"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(MoeServeError, match="empty"):
        tokenizer.apply_chat_template([])


def test_named_templates_and_jinja_file(tmp_path):
    write_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "plain"
    (tmp_path / "chat_template.jinja").write_text("from-file")
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "from-file"


def test_a_lone_surrogate_is_a_user_error_not_a_type_error(tokenizer):
    """JSON's "\\ud800" escape decodes to a str that is not valid Unicode; the tokenizers library raised TypeError."""
    with pytest.raises(MoeServeError, match=r"^the text contains a lone surrogate \(U\+D800\) at character 6, "):
        tokenizer.encode("hello \ud800 world")
    assert tokenizer.encode("hello \U0001F600")  # a character beyond the BMP (a surrogate pair in JSON) is fine
