"""Per-step metadata handed to the model: which blocks, which positions, which tokens.

Built by the model runner on the host, once per step; the model only reads it. A step is either a
prefill/extend step (`StepContext`: each sequence brings `query_len` new tokens after `cached_len`
cached ones, described by host lists) or a decode step (`DecodeContext`: every sequence brings exactly
one token, described by device tensors only).

A decode step's shapes depend on the batch size and one bucketed length, `span`, never on the exact
lengths: each sequence reads its blocks up to `span` positions (its block table padded with the null
block) under a mask built on the device from its position. So a decode step has no host sync and no
shape that changes from one token to the next; it compiles without graph breaks, and a CUDA graph
captured for a (batch, span) pair replays for every step that fits it, its block tables being static
inputs refreshed by each step.

Where attention gathers blocks (every device but a GPU with the paged kernel), a step's rows are cut
into parts of similar length (`parts`, rows sorted by length), each read at its own span: one long
sequence among short ones then costs its own length, not every row's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from moeserve.kv.blocks import blocks_for
from moeserve.kv.cache import PagedKVCache

# Decode steps read at least this many cached positions per row; spans are powers of two above it.
MIN_DECODE_SPAN = 64


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def decode_blocks(longest: int, block_size: int, max_blocks: int) -> int:
    """Blocks a decode step reads per row: a power of two covering `longest` positions and at least
    MIN_DECODE_SPAN, within the `max_blocks` of a whole context."""
    span = max(MIN_DECODE_SPAN, next_power_of_two(longest))
    return min(blocks_for(span, block_size), max_blocks)


@dataclass(frozen=True)
class Part:
    """Rows start..end-1 of a decode step, read over their first `blocks` blocks."""

    start: int
    end: int
    blocks: int


@dataclass
class StepContext:
    """A prefill/extend step."""

    cache: PagedKVCache
    positions: torch.Tensor  # [T] long, on the compute device
    slots: torch.Tensor  # [groups, T] long: where each new token's K/V go (block * block_size + offset)
    query_lens: list[int]  # new tokens of each sequence in this step
    cached_lens: list[int]  # tokens of each sequence already in the cache
    block_tables: list[list[list[int]]]  # [sequence][group] → block ids
    is_decode: ClassVar[bool] = False
    max_position: int = field(init=False)
    _tables: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self.max_position = max(c + q for c, q in zip(self.cached_lens, self.query_lens)) - 1

    def allowed(self, seq: int, window: int | None) -> torch.Tensor:
        """[new, cached+new] bool: the keys each new query of sequence `seq` may see (its own position and
        earlier ones, within `window` if set). Made once a step; every layer with that window reads it."""
        key = (seq, window, torch.bool)
        if key not in self._masks:
            cached, new = self.cached_lens[seq], self.query_lens[seq]
            device = self.positions.device
            query_pos = torch.arange(cached, cached + new, device=device)[:, None]
            key_pos = torch.arange(cached + new, device=device)[None, :]
            allowed = key_pos <= query_pos
            if window is not None:
                allowed &= key_pos > query_pos - window
            self._masks[key] = allowed
        return self._masks[key]

    def mask(self, seq: int, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """`allowed` as SDPA's additive mask in `dtype` (0 where allowed, -inf elsewhere: what SDPA would
        make of the boolean mask in every layer), made once a step; None where plain causal attention
        suffices (nothing cached and no window)."""
        if self.cached_lens[seq] == 0 and window is None:
            return None
        key = (seq, window, dtype)
        if key not in self._masks:
            allowed = self.allowed(seq, window)
            self._masks[key] = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
                ~allowed, float("-inf")
            )
        return self._masks[key]

    def read(self, layer: int, seq: int, group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sequence `seq`'s cached and new entries of one layer: keys and values [total, G, Dh] (values None
        for MLA)."""
        if (seq, group) not in self._tables:
            n = blocks_for(self.cached_lens[seq] + self.query_lens[seq], self.cache.block_size)
            self._tables[seq, group] = torch.tensor(self.block_tables[seq][group][:n], device=self.positions.device)
        total = self.cached_lens[seq] + self.query_lens[seq]
        index = self._tables[seq, group]
        keys, values = self.cache.gather(layer, index, 1, self.cache.workspace(index.shape[0]))
        return keys[0, :total], None if values is None else values[0, :total]


@dataclass
class DecodeContext:
    """A decode step: one new token per sequence, at `positions`, its K/V written at `slots`."""

    cache: PagedKVCache
    positions: torch.Tensor  # [B] long: each sequence's new token's position (= its cached length)
    slots: torch.Tensor  # [groups, B] long: where each new token's K/V go (block * block_size + offset)
    tables: torch.Tensor  # [groups, B, span / block_size] long: block tables, padded with the null block
    parts: tuple[Part, ...]  # where attention gathers: row ranges and the blocks each reads
    use_kernel: bool = False  # attention reads the blocks in place (layers/paged_attention.py)
    is_decode: ClassVar[bool] = True
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict)
    _indices: dict[tuple, tuple] = field(default_factory=dict)  # → (block index [n * count], workspace views)

    @property
    def span(self) -> int:
        return self.tables.shape[2] * self.cache.block_size

    @property
    def max_position(self) -> int:
        """The rotary table must cover every position a row may read."""
        return self.span - 1

    def _window(self, window: int | None, part: Part) -> tuple[torch.Tensor | None, int]:
        """The first block each row of `part` reads ([n] long; None: block 0 for every row) and how many it
        reads: a sliding window's rows read only the blocks their window reaches, so their cost is the
        window's, not the sequence's."""
        if window is None:
            return None, part.blocks
        count = min(part.blocks, blocks_for(window, self.cache.block_size) + 1)
        if count == part.blocks:
            return None, count
        last = self.positions[part.start : part.end] // self.cache.block_size  # [n]
        return (last - (count - 1)).clamp(min=0), count

    def mask(self, window: int | None, part: Part) -> torch.Tensor:
        """[n, 1, 1, L] bool: the positions rows of `part` read (see `read`) that they may attend to (their
        own and earlier, within `window`)."""
        key = (window, part.start)
        mask = self._masks.get(key)
        if mask is None:
            first, count = self._window(window, part)
            size = self.cache.block_size
            key_pos = torch.arange(count * size, device=self.positions.device)[None, :]  # [1, L]
            if first is not None:
                key_pos = key_pos + first[:, None] * size  # [n, L]
            newest = self.positions[part.start : part.end, None]  # [n, 1]
            allowed = key_pos <= newest
            if window is not None:
                allowed &= key_pos > newest - window
            mask = allowed[:, None, None, :]
            _remember(self._masks, key, mask)
        return mask

    def read(self, layer: int, group: int, part: Part, window: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of `part`: one layer's keys and values over the blocks they read (all up to the part's span,
        or those `window` reaches), [n, G, L, Dh] each (views of a workspace; values None for MLA)."""
        key = (group, part.start, window)
        known = self._indices.get(key)
        if known is None:  # the same for every layer of the step: made once
            first, count = self._window(window, part)
            tables = self.tables[group, part.start : part.end]  # [n, blocks]
            if first is None:
                tables = tables[:, :count]
            else:
                tables = tables.gather(1, first[:, None] + torch.arange(count, device=tables.device))  # [n, count]
            index = tables.reshape(-1)
            known = index, self.cache.workspace(index.shape[0])
            _remember(self._indices, key, known)
        index, out = known
        keys, values = self.cache.gather(layer, index, part.end - part.start, out)
        return keys.transpose(1, 2), None if values is None else values.transpose(1, 2)


def _remember(memo: dict, key: tuple, value) -> None:
    """Keep what a step computed once for all its layers, except in a compiled step's trace: there each layer's
    copy is merged by the compiler, and a write to the step's context would be a side effect that every call
    of the compiled step had to replay after the graph (engine/direct_graph.py calls the graph alone)."""
    if not torch.compiler.is_compiling():
        memo[key] = value
