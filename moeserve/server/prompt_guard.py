"""Refuse a text that cannot fit the context before tokenizing it, with a bound proven for the tokenizer.

In:  the model's `Tokenizer` and context length; prompt texts (completions, the rendered chat
     template, /tokenize) on a worker thread, before they are encoded.
Out: nothing, or an `ApiError` 400 naming the input, when its character count alone proves that
     it has more tokens than the limit, or when it is not valid Unicode (a lone surrogate, which the
     tokenizer refuses).

Why: encoding holds the GIL, and some pre-tokenizer regexes are quadratic in the length of a run
of letters (the embedded model's takes 38 s for 100,000 letters), so a few megabytes of prompt
would stall every other request, /health included, and grow the process by a gigabyte. With this
bound, what is encoded is at most `chars_per_token × limit` characters.

The bound. For a tokenizer whose tokens cover the (normalized) text without dropping any of it,
each token covers at most `chars_per_token` characters, the length of the longest vocabulary
entry: a byte-level BPE entry spells one byte per character and a character is at least one byte;
a SentencePiece-style entry spells its characters (`▁` for a space), a byte-fallback entry
(`<0x41>`) covers one. Special tokens count with their full text. So a text of `n` normalized
characters has at least ceil(n / chars_per_token) tokens, and refusing when that exceeds the limit
refuses nothing that could fit. The tokenizer's JSON is checked for what would break coverage: a
pre-tokenizer that removes characters (whitespace splitters, `Split` with `Removed`), a vocabulary
that cannot spell every byte or character, or a model type other than BPE and Unigram. When coverage
is not proven, there is no bound (`chars_per_token` is None) and the request body limit is the only
size limit.
"""

from __future__ import annotations

import json
import math

from moeserve.server.errors import ApiError
from moeserve.server.protocol import check_text
from moeserve.tokenizer import Tokenizer

_DROPPING_PRE_TOKENIZERS = {"Whitespace", "WhitespaceSplit", "BertPreTokenizer", "CharDelimiterSplit"}


class PromptGuard:
    def __init__(self, tokenizer: Tokenizer | None, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.chars_per_token = chars_per_token_bound(tokenizer) if tokenizer is not None else None

    def check(self, text: str, max_tokens: int, name: str) -> None:
        """Raise a 400 when `text` certainly has more than `max_tokens` tokens. Linear in the text
        at most (its normalization); run it off the event loop."""
        check_text(text, name)
        if self.chars_per_token is None:
            return
        normalizer = self.tokenizer.backend.normalizer
        length = len(text) if normalizer is None else len(normalizer.normalize_str(text))
        at_least = math.ceil(length / self.chars_per_token)
        if at_least > max_tokens:
            raise ApiError(
                400,
                f"{name} has {length} characters, so at least {at_least} tokens (a token of this tokenizer covers "
                f"at most {self.chars_per_token} characters), but the context of {self.max_model_len} tokens leaves "
                f"room for {max_tokens}; shorten it.",
                name.split("[")[0],
            )

    def check_prompt(self, text: str, name: str) -> None:
        """A prompt to generate from: it must leave room for one generated token."""
        self.check(text, self.max_model_len - 1, name)


def chars_per_token_bound(tokenizer: Tokenizer) -> int | None:
    """The most characters of normalized text one token can cover, or None when coverage is not proven."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") not in ("BPE", "Unigram"):
        return None
    pre_tokenizers = list(_walk(spec.get("pre_tokenizer")))
    if any(_drops_characters(p) for p in pre_tokenizers):
        return None
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    byte_level = any(p.get("type") == "ByteLevel" for p in pre_tokenizers)
    if byte_level:
        from tokenizers.pre_tokenizers import ByteLevel

        if not set(ByteLevel.alphabet()) <= vocab.keys():
            return None  # a byte the vocabulary cannot spell would be dropped
    elif not model.get("byte_fallback") and (
        model["type"] == "Unigram" or model.get("unk_token") is None or model.get("fuse_unk")
    ):
        return None  # an unknown character could be dropped, or a run of them fused into one token
    return max(len(entry) for entry in vocab)


def _walk(node):
    """Every pre-tokenizer in a (possibly nested) `Sequence`."""
    if not isinstance(node, dict):
        return
    yield node
    for child in node.get("pretokenizers") or []:
        yield from _walk(child)


def _drops_characters(pre_tokenizer: dict) -> bool:
    kind = pre_tokenizer.get("type")
    return kind in _DROPPING_PRE_TOKENIZERS or pre_tokenizer.get("behavior") == "Removed"
