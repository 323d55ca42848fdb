"""Text ↔ token ids with the checkpoint's own `tokenizer.json`, and its chat template.

In:  `tokenizer.json` (the `tokenizers` library), `tokenizer_config.json` (special tokens,
     `chat_template`), or a `chat_template.jinja` file beside them.
Out: `Tokenizer.encode/decode/apply_chat_template`, and `IncrementalDetokenizer`, which turns a
     growing list of generated ids into text deltas without re-decoding the whole output.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HfTokenizer

from moeserve.errors import InputError, ModelLoadError


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(text: str, name: str) -> None:
    """Raise an InputError naming `name` when `text` holds a lone surrogate: it is not valid Unicode, and the
    tokenizers library refuses it with a TypeError. A Python str holds one only from input such as JSON's
    "\\ud800" escape (the two escapes of a pair decode to one character)."""
    match = _SURROGATE.search(text)
    if match is not None:
        raise InputError(
            f"{name} contains a lone surrogate (U+{ord(match.group()):04X}) at character {match.start()}, which is "
            f"not valid Unicode; send the character itself or a complete surrogate pair."
        )


def load_tokenizer(model_dir: Path) -> Tokenizer | None:
    """The directory's tokenizer, or None when it ships without `tokenizer.json` (ids-only use)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        backend = HfTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises plain Exception subclasses
        raise ModelLoadError(f"{path} cannot be read by the tokenizers library ({exc}); re-export it.") from None
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return Tokenizer(backend, config, _find_chat_template(model_dir, config))


def _find_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if template is None and (model_dir / "chat_template.json").is_file():
        template = json.loads((model_dir / "chat_template.json").read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, backend: HfTokenizer, config: dict[str, Any], chat_template: str | None):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.special_tokens = {
            key: _token_text(config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(key) is not None
        }
        self.eos_token_id = backend.token_to_id(self.eos_token) if self.eos_token else None
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_unicode(text, "the text")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise InputError(
                "this model's tokenizer_config.json has no chat_template; send a plain prompt instead of messages."
            )
        if not messages:
            raise InputError("messages is empty; send at least one message.")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
            self._template = env.from_string(self.chat_template)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except TemplateError as exc:
            raise InputError(f"the chat template rejected these messages: {exc}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # The rendered template already contains any BOS it wants; adding specials would double it.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def _raise_template_exception(message: str):
    raise TemplateError(message)


class IncrementalDetokenizer:
    """Decodes generated ids as they arrive; after `flush`, `text` equals `decode(ids)`.

    A token may end in the middle of a multi-byte character, which decodes as a trailing U+FFFD
    until the following tokens complete it; only that unstable tail is held back, so text before
    it (and any stop string in it) is seen as soon as it is generated.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # start of the window re-decoded for context
        self._read_offset = 0  # ids up to here are fully emitted
        self._emitted_past_read = 0  # characters emitted from ids beyond `_read_offset`

    def add(self, token_id: int) -> str:
        """Append one id; return the text it makes final (possibly empty)."""
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of generation: emit held-back text even if it ends in an incomplete character."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        full = decode(self.ids[self._prefix_offset :], self.skip_special_tokens)
        stable = full if final else full.rstrip("\ufffd")
        start = len(prefix) + self._emitted_past_read
        delta = stable[start:] if len(stable) > start else ""
        self.text += delta
        if stable == full:
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            self._emitted_past_read = 0
        else:
            self._emitted_past_read += len(delta)
        return delta
