"""Pieces both OpenAI endpoints share: per-choice accumulation of updates, token strings, usage.

In:  `SeqUpdate`s from a `RequestHandle` (async_engine.py).
Out: plain dicts in OpenAI's response shapes (serialized once, by the route or the event stream).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from moeserve.engine.sequence import TokenLogprobs
from moeserve.server.async_engine import RequestHandle, SeqUpdate
from moeserve.tokenizer import Tokenizer


@dataclass
class Choice:
    """Everything one sequence produced so far."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list | None = None

    def absorb(self, update: SeqUpdate) -> None:
        self.token_ids += update.token_ids
        self.logprobs += update.logprobs
        self.text += update.text_delta
        if update.prompt_logprobs is not None:
            self.prompt_logprobs = update.prompt_logprobs
        if update.finish_reason is not None:
            self.finish_reason, self.stop_reason = update.finish_reason, update.stop_reason


async def collect_choices(handle: RequestHandle) -> list[Choice]:
    """Every choice of a non-streaming request, once all have finished."""
    choices = [Choice() for _ in handle.seqs]
    try:
        async for batch in handle.updates():
            for update in batch:
                choices[update.index].absorb(update)
    finally:
        handle.abort()  # no-op once finished; frees the sequences if we were cancelled
    return choices


def merge(batch: list[SeqUpdate]) -> dict[int, SeqUpdate]:
    """Coalesce a batch of updates per choice (a slow reader gets fewer, larger chunks)."""
    merged: dict[int, SeqUpdate] = {}
    for update in batch:
        seen = merged.get(update.index)
        if seen is None:
            merged[update.index] = SeqUpdate(
                update.index,
                list(update.token_ids),
                list(update.logprobs),
                update.text_delta,
                update.finish_reason,
                update.stop_reason,
                update.prompt_logprobs,
                update.step_start,
            )
        else:
            seen.token_ids += update.token_ids
            seen.logprobs += update.logprobs
            seen.text_delta += update.text_delta
            seen.finish_reason, seen.stop_reason = update.finish_reason, update.stop_reason
            seen.prompt_logprobs = seen.prompt_logprobs or update.prompt_logprobs
    return merged


class TokenText:
    """Token id → its text as a logprobs entry shows it (special tokens included); cached."""

    def __init__(self, tokenizer: Tokenizer | None):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self._tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text

    def decode(self, ids: list[int]) -> str:
        return "" if self._tokenizer is None else self._tokenizer.decode(ids, skip_special_tokens=False)


def completion_logprobs(
    token_text: TokenText, ids: list[int], entries: list[TokenLogprobs | None], offset: int = 0
) -> dict:
    """OpenAI's legacy logprobs object: tokens, token_logprobs, top_logprobs (chosen token and the
    requested alternatives), text_offset (characters from the start of the returned text)."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, entry in zip(ids, entries):
        text = token_text(token_id)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if entry is None:  # the first prompt token has nothing to be predicted from
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token_logprobs.append(entry.get(token_id))
            top_logprobs.append({token_text(t): lp for t, lp in entry.items()})
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_logprobs(token_text: TokenText, ids: list[int], entries: list[TokenLogprobs], top_n: int) -> dict:
    """OpenAI's chat logprobs object: per token its logprob and the `top_n` most likely tokens."""
    content = []
    for token_id, entry in zip(ids, entries):
        text = token_text(token_id)
        best = sorted(entry.items(), key=lambda item: -item[1])[:top_n]
        content.append(
            {
                "token": text,
                "logprob": entry[token_id],
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode())} for t, lp in best
                ],
            }
        )
    return {"content": content}


def usage(prompts: list, completion_tokens: int) -> dict:
    """OpenAI's usage of a request whose prompts ran as the sequences `prompts` (one per prompt):
    `prompt_tokens_details.cached_tokens` counts the prompt tokens found in the prefix cache."""
    prompt_tokens = sum(len(seq.prompt_ids) for seq in prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(seq.num_cached_prompt_tokens for seq in prompts)},
    }


def now() -> int:
    return int(time.time())
