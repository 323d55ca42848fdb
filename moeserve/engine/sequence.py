"""One request's state as it moves through the engine: waiting → running → finished.

A running sequence may be preempted (its KV blocks taken back) and go back to waiting; it then keeps its
generated tokens and recomputes their K/V when it runs again.

A sequence carries the expert provider it runs on, set once when it is submitted: the scheduler groups
steps by it and the runner computes with it, so a running sequence's provider is read from here only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from moeserve.engine.sampling_params import SamplingParams
from moeserve.experts import ExpertProvider
from moeserve.kv.blocks import BlockTables
from moeserve.tokenizer import IncrementalDetokenizer

TokenLogprobs = dict[int, float]  # token id → log-probability; the sampled token first


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int  # prompt + generated tokens may not exceed this (the context)
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator | None  # per-request RNG on the compute device when `seed` is set
    prompt: str | None = None
    experts: ExpertProvider | None = None  # set once by LLMEngine.submit; None only before that
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    blocks: BlockTables | None = None  # the KV blocks it holds (kv/blocks.py); None while it holds none
    num_cached: int = 0  # leading tokens whose K/V are in the cache
    cache_salt: bytes = b""  # what computed its K/V (model, dtype, expert policy): its prefix-cache blocks' salt
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache when it was first admitted
    text: str = ""
    text_emitted: int = 0  # leading characters of `text` already handed out in step outputs
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
