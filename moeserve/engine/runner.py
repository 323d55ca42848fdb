"""Runs one forward step of the model for a batch of sequences.

In:  the sequences of a step (from the scheduler, which gave each the KV blocks its tokens need); each
     brings its uncached tokens.
Out: float32 logits for the positions that need them; the K/V of the step stay in the paged cache.

Owns the per-step contexts (host-built metadata: positions, write slots, block tables), the paged KV
cache on the compute device and, on a GPU, the decode steps' CUDA graphs. Holds no expert provider:
each call is given the one of its step.
"""

from __future__ import annotations

import torch

from moeserve.engine.compiled_decode import CompiledDecode
from moeserve.engine.decode_graphs import DecodeGraphs
from moeserve.engine.sequence import Sequence
from moeserve.experts import ExpertProvider
from moeserve.kv.blocks import blocks_for, tokens_between, write_slot
from moeserve.kv.cache import KvLayout, PagedKVCache
from moeserve.kv.context import DecodeContext, Part, StepContext, decode_blocks
from moeserve.layers.grouped_gemm import runs_kernel
from moeserve.layers.paged_attention import runs_paged_kernel
from moeserve.models.decoder import MoeCausalLM


def kv_layout(model: MoeCausalLM) -> KvLayout:
    config = model.config
    heads, head_dim, separate_values = config.kv_cache_layout
    return KvLayout(config.num_layers, heads, head_dim, separate_values, tuple(config.sliding_windows), config.dtype)


class ModelRunner:
    def __init__(
        self,
        model: MoeCausalLM,
        device: torch.device,
        max_len: int,
        num_blocks: int,
        block_size: int,
        enforce_eager: bool = False,
        progress: bool = True,
    ):
        self.model = model
        self.device = device
        self.max_len = max_len
        self.cache = PagedKVCache(kv_layout(model), num_blocks, block_size, device)
        self.max_blocks = blocks_for(max_len, block_size)  # of one sequence's table
        self.paged_kernel = runs_paged_kernel(device, self.cache.dtype)
        # decode steps replay CUDA graphs where they can (engine/decode_graphs.py)
        # (they need the grouped GEMM's kernel: without triton, MoE blocks on a GPU read routing on the host)
        capturable = device.type == "cuda" and runs_kernel(device) and not enforce_eager
        self.graphs = DecodeGraphs(model, self, device) if capturable else None
        # a CPU's decode steps run compiled (engine/compiled_decode.py)
        self.compiled = CompiledDecode(model, self, progress) if device.type == "cpu" and not enforce_eager else None

    @property
    def blocks(self):
        """The block manager: which blocks each sequence holds."""
        return self.cache.manager

    def extend(
        self, seqs: list[Sequence], all_positions: list[bool], experts: ExpertProvider, counts: list[int] | None = None
    ) -> list[torch.Tensor]:
        """Run the next `counts[i]` uncached tokens of `seqs[i]` (None: all of them) on `experts`. Per
        sequence: logits [n, V] for all its new positions where `all_positions[i]`, else [1, V] for its last
        new position only."""
        size = self.cache.block_size
        if counts is None:
            counts = [seq.num_tokens - seq.num_cached for seq in seqs]
        ids, positions, wanted, spans, slots = [], [], [], [], [[] for _ in range(self.cache.num_groups)]
        for seq, everything, count in zip(seqs, all_positions, counts):
            end = seq.num_cached + count
            self.cover(seq, end)
            new = tokens_between(seq.prompt_ids, seq.output_ids, seq.num_cached, end)
            base = len(ids)
            ids.extend(new)
            new_positions = range(seq.num_cached, end)
            positions.extend(new_positions)
            for group, table in zip(slots, seq.blocks.tables):
                group.extend(write_slot(table, p, size) for p in new_positions)
            first = base if everything else base + len(new) - 1
            spans.append((len(wanted), len(wanted) + base + len(new) - first))
            wanted.extend(range(first, base + len(new)))
        host = torch.tensor([positions, *slots])  # [1 + groups, T]
        on_device = host.to(self.device, non_blocking=True)
        ctx = StepContext(
            cache=self.cache,
            positions=on_device[0],
            slots=on_device[1:],
            query_lens=counts,
            cached_lens=[seq.num_cached for seq in seqs],
            block_tables=[seq.blocks.tables for seq in seqs],
        )
        logits = self.model(
            torch.tensor(ids, device=self.device), ctx, experts, torch.tensor(wanted, device=self.device)
        )  # [N, V]
        for seq, count in zip(seqs, counts):
            seq.num_cached += count
            self._cached(seq)
        return [logits[a:b] for a, b in spans]

    def decode(self, seqs: list[Sequence], experts: ExpertProvider) -> torch.Tensor:
        """One new token per sequence (each has exactly one uncached token), on `experts` → logits [B, V]."""
        if self.graphs is not None and self.graphs.fits(seqs):
            for seq in seqs:
                self.cover(seq, seq.num_tokens)
            logits = self.graphs.decode(seqs, experts)  # [B, V]
        elif self.compiled is not None and self.compiled.fits(seqs):
            for seq in seqs:
                self.cover(seq, seq.num_tokens)
            logits = self.compiled.decode(seqs, experts)  # [B, V]
        else:
            ids, ctx = self.decode_inputs(seqs)
            logits = self.model(ids, ctx, experts)  # [B, V]
        for seq in seqs:
            seq.num_cached += 1
            self._cached(seq)
        return logits

    def _cached(self, seq: Sequence) -> None:
        """After a step: `seq`'s full blocks become findable by later prompts, then a sliding window's blocks
        that no later query sees go (both in that order, so they stay findable once released)."""
        blocks = self.blocks
        # (a sequence never submitted, as `LLM.score` runs one, has no salt: nothing to share it under)
        if blocks.prefix_caching and seq.cache_salt and seq.num_cached // self.cache.block_size > len(seq.blocks.hashes):
            blocks.commit(seq.blocks, seq.prompt_ids, seq.output_ids, seq.num_cached, seq.cache_salt)
        blocks.leave_window(seq.blocks, seq.num_cached)

    def decode_blocks(self, seqs: list[Sequence]) -> int:
        """Blocks per row the decode step of `seqs` reads (its span, in blocks)."""
        return decode_blocks(max(seq.num_tokens for seq in seqs), self.cache.block_size, self.max_blocks)

    def block_tables(self, seqs: list[Sequence], rows: int, blocks: int) -> torch.Tensor:
        """[groups, rows, blocks] long on the host: each sequence's tables, padded with the null block
        (as are rows past the sequences)."""
        padding = [0] * blocks
        tables = [
            [(seq.blocks.tables[group][:blocks] + padding)[:blocks] for seq in seqs] + [padding] * (rows - len(seqs))
            for group in range(self.cache.num_groups)
        ]
        return torch.tensor(tables, dtype=torch.long)

    def decode_inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, DecodeContext]:
        """The decode step's token ids [B] and context, with one host→device copy of ids, positions and
        write slots and one of the block tables."""
        for seq in seqs:
            self.cover(seq, seq.num_tokens)
        parts = self.parts(seqs)
        blocks = max(part.blocks for part in parts)
        host = self.step_inputs(seqs, len(seqs)).to(self.device, non_blocking=True)  # [2 + groups, B]
        tables = self.block_tables(seqs, len(seqs), blocks).to(self.device, non_blocking=True)
        ctx = DecodeContext(self.cache, host[1], host[2:], tables, parts, use_kernel=self.paged_kernel)
        return host[0], ctx

    def step_inputs(self, seqs: list[Sequence], rows: int) -> torch.Tensor:
        """[2 + groups, rows] long on the host: token ids, positions and, per layer group, where each new
        token's K/V go; rows past the sequences decode token 0 at position 0 of the null block."""
        size = self.cache.block_size
        positions = [seq.num_cached for seq in seqs]
        inputs = [[seq.output_ids[-1] for seq in seqs], positions] + [
            [write_slot(seq.blocks.tables[group], p, size) for seq, p in zip(seqs, positions)]
            for group in range(self.cache.num_groups)
        ]
        padding = [0] * (rows - len(seqs))
        return torch.tensor([row + padding for row in inputs], dtype=torch.long)

    def parts(self, seqs: list[Sequence]) -> tuple[Part, ...]:
        """Runs of consecutive rows whose lengths bucket alike, each read over its own span (kv/context.py)."""
        size, most = self.cache.block_size, self.max_blocks
        lengths = [seq.num_tokens for seq in seqs]
        shortest, longest = decode_blocks(min(lengths), size, most), decode_blocks(max(lengths), size, most)
        if shortest == longest:
            return (Part(0, len(seqs), longest),)
        parts: list[Part] = []
        for row, seq in enumerate(seqs):
            blocks = decode_blocks(seq.num_tokens, size, most)
            if parts and parts[-1].blocks == blocks:
                parts[-1] = Part(parts[-1].start, row + 1, blocks)
            else:
                parts.append(Part(row, row + 1, blocks))
        return tuple(parts)

    def cover(self, seq: Sequence, tokens: int) -> None:
        """Give `seq` blocks for positions 0..tokens-1 (the scheduler normally has already)."""
        if seq.blocks is None:
            seq.blocks = self.blocks.new_tables()
        self.blocks.cover(seq.blocks, tokens)

