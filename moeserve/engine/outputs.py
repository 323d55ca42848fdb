"""What the engine hands out: per step, what each sequence produced (`StepOutput`); per finished
prompt of `LLM.generate`, the whole result (`RequestOutput`).

In:  the sequences of one step, just advanced by the engine.
Out: snapshots that share nothing mutable with the engine, safe to pass to another thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.engine.sequence import Sequence, TokenLogprobs


@dataclass(slots=True)
class StepOutput:
    """What one sequence produced in one step."""

    seq_id: int
    token_ids: list[int]  # the new token(s)
    logprobs: list[TokenLogprobs]  # their log-probabilities, when requested (else empty)
    # New text, never taken back: with stop strings the tail that could still start one is held back
    # until the sequence finishes or more text follows, so the deltas of a sequence concatenate to its
    # final text (a matched stop string cut).
    text_delta: str
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while it runs
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # the step that ran its prompt, when requested


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only (a final EOS / stop token included)
    text: str  # generated text, without special tokens and without a matched stop string
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length" (max_tokens / context)
    stop_reason: str | int | None  # the stop string or stop token id that ended it, if any
    logprobs: list[TokenLogprobs] | None  # per generated token, when requested
    prompt_logprobs: list[TokenLogprobs | None] | None  # per prompt token (first is None), when requested
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (their K/V were not computed again)

    @classmethod
    def from_sequence(cls, seq: Sequence) -> RequestOutput:
        return cls(
            request_id=seq.seq_id,
            prompt=seq.prompt,
            prompt_token_ids=list(seq.prompt_ids),
            token_ids=list(seq.output_ids),
            text=seq.text,
            finish_reason=seq.finish_reason or "length",
            stop_reason=seq.stop_reason,
            logprobs=seq.logprobs if seq.params.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
            num_cached_tokens=seq.num_cached_prompt_tokens,
        )
