"""Runs one forward step of the model for a batch of sequences.

In:  the sequences of a step (from the scheduler); each brings its uncached tokens.
Out: float32 logits for the positions that need them; the K/V of the step stay in the cache.

Owns the per-step contexts (host-built metadata), the KV cache on the compute device and, on a GPU,
the decode steps' CUDA graphs. Holds no expert provider: each call is given the one of its step.
"""

from __future__ import annotations

import torch

from moeserve.kv.context import DecodeContext, StepContext, decode_span
from moeserve.engine.decode_graphs import DecodeGraphs
from moeserve.kv.cache import KVCache
from moeserve.layers.grouped_gemm import runs_kernel
from moeserve.engine.sequence import Sequence
from moeserve.experts import ExpertProvider
from moeserve.models.decoder import MoeCausalLM


class ModelRunner:
    def __init__(self, model: MoeCausalLM, device: torch.device, max_len: int, enforce_eager: bool = False):
        config = model.config
        self.model = model
        self.device = device
        heads, head_dim, separate_values = config.kv_cache_layout
        self.cache = KVCache(config.num_layers, heads, head_dim, max_len, config.dtype, device, separate_values)
        # decode steps replay CUDA graphs where they can (engine/decode_graphs.py)
        # (they need the grouped GEMM's kernel: without triton, MoE blocks on a GPU read routing on the host)
        capturable = device.type == "cuda" and runs_kernel(device) and not enforce_eager
        self.graphs = DecodeGraphs(model, self.cache, device) if capturable else None

    def extend(self, seqs: list[Sequence], all_positions: list[bool], experts: ExpertProvider) -> list[torch.Tensor]:
        """Run every uncached token of `seqs` on `experts`. Per sequence: logits [n, V] for all its new
        positions where `all_positions[i]`, else [1, V] for its last position only."""
        for seq in seqs:
            if seq.kv_row < 0:
                self.cache.allocate(seq, seq.num_tokens)
        self.cache.reserve(max(seq.num_tokens for seq in seqs))
        ids, positions, wanted, spans = [], [], [], []
        for seq, everything in zip(seqs, all_positions):
            new = seq.all_ids[seq.num_cached :]
            base = len(ids)
            ids.extend(new)
            positions.extend(range(seq.num_cached, seq.num_tokens))
            first = base if everything else base + len(new) - 1
            spans.append((len(wanted), len(wanted) + base + len(new) - first))
            wanted.extend(range(first, base + len(new)))
        ctx = StepContext(
            cache=self.cache,
            positions=torch.tensor(positions, device=self.device),
            rows=[seq.kv_row for seq in seqs],
            query_lens=[seq.num_tokens - seq.num_cached for seq in seqs],
            cached_lens=[seq.num_cached for seq in seqs],
        )
        logits = self.model(
            torch.tensor(ids, device=self.device), ctx, experts, torch.tensor(wanted, device=self.device)
        )  # [N, V]
        for seq in seqs:
            seq.num_cached = seq.num_tokens
        return [logits[a:b] for a, b in spans]

    def decode(self, seqs: list[Sequence], experts: ExpertProvider) -> torch.Tensor:
        """One new token per sequence (each has exactly one uncached token), on `experts` → logits [B, V]."""
        if self.graphs is not None and self.graphs.fits(seqs):
            logits = self.graphs.decode(seqs, experts)  # [B, V]
        else:
            ids, ctx = self.decode_inputs(seqs)
            logits = self.model(ids, ctx, experts)  # [B, V]
        for seq in seqs:
            seq.num_cached += 1
        return logits

    def decode_inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, DecodeContext]:
        """The decode step's token ids [B] and context, with one host→device copy."""
        longest = max(seq.num_tokens for seq in seqs)
        self.cache.reserve(longest)
        rows = [seq.kv_row for seq in seqs]
        host = torch.tensor([[seq.output_ids[-1] for seq in seqs], [seq.num_cached for seq in seqs], rows])  # [3, B]
        ids, positions, row_index = host.to(self.device, non_blocking=True).unbind(0)  # [B] each
        ctx = DecodeContext(
            cache=self.cache,
            positions=positions,
            row_index=row_index,
            span=decode_span(longest, self.cache.capacity),
            rows_are_prefix=rows == list(range(len(rows))),
        )
        return ids, ctx

    def release(self, seq: Sequence) -> None:
        if seq.kv_row >= 0:
            self.cache.free(seq)
        seq.num_cached = 0
