"""Per-step metadata handed to the model: which cache rows, which positions, which tokens.

Built by the model runner on the host, once per step; the model only reads it. A step is either
a prefill/extend step (`StepContext`: each sequence brings `query_len` new tokens after `cached_len`
cached ones, described by host lists) or a decode step (`DecodeContext`: every sequence brings exactly
one token, described by device tensors only).

A decode step's shapes depend on the batch size and one bucketed length, `span`, never on the exact
lengths: each sequence reads its cache row up to `span` positions under a mask built on the device
from its position. So a decode step has no host sync and no shape that changes from one token to the
next; it compiles without graph breaks, a CUDA graph captured for a (batch, span) pair replays for
every step that fits it, and attention backends that plan per shape plan once per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from moeserve.kv.cache import KVCache, next_power_of_two

# Decode steps read at least this many cached positions per row; spans are powers of two above it.
MIN_DECODE_SPAN = 64


def decode_span(longest: int, capacity: int) -> int:
    """Positions a decode step reads per row: the smallest power of two >= `longest` (and >= 64),
    within the cache's `capacity` (which is itself such a power of two, or the context length)."""
    span = max(MIN_DECODE_SPAN, next_power_of_two(longest))
    return min(span, capacity)


@dataclass
class StepContext:
    """A prefill/extend step."""

    cache: KVCache
    positions: torch.Tensor  # [T] long, on the compute device
    rows: list[int]  # cache row of each sequence, in token order
    query_lens: list[int]  # new tokens of each sequence in this step
    cached_lens: list[int]  # tokens of each sequence already in the cache
    is_decode: ClassVar[bool] = False
    max_position: int = field(init=False)

    def __post_init__(self):
        self.max_position = max(c + q for c, q in zip(self.cached_lens, self.query_lens)) - 1


@dataclass
class DecodeContext:
    """A decode step: one new token per sequence, at `positions`, written into cache rows `row_index`."""

    cache: KVCache
    positions: torch.Tensor  # [B] long: each sequence's new token's position (= its cached length)
    row_index: torch.Tensor  # [B] long: each sequence's cache row
    span: int  # positions read per row (decode_span of the longest sequence); fixed per shape bucket
    rows_are_prefix: bool  # row_index is 0..B-1: the step reads one slice of the cache, no gather
    is_decode: ClassVar[bool] = True
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @property
    def max_position(self) -> int:
        """The rotary table must cover every position a row may read."""
        return self.span - 1

    def cached(self, layer_tensor: torch.Tensor) -> torch.Tensor:
        """One layer's cache [rows, G, capacity, Dh] → this step's rows up to `span` [B, G, span, Dh]."""
        if self.rows_are_prefix:
            return layer_tensor[: self.row_index.shape[0], :, : self.span]
        return layer_tensor[self.row_index, :, : self.span]

    def mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, span] bool: the cached positions each sequence may attend to (its own, within `window`)."""
        if window not in self._masks:
            key_pos = torch.arange(self.span, device=self.positions.device)[None, :]  # [1, span]
            newest = self.positions[:, None]  # [B, 1]
            allowed = key_pos <= newest
            if window is not None:
                allowed &= key_pos > newest - window
            self._masks[window] = allowed[:, None, None, :]
        return self._masks[window]
