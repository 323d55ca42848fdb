"""The one narrow interface through which MoE blocks get their expert weights.

In:  (layer id, sorted expert ids) from the MoE block of that layer, once per forward step;
     optionally predictions of the next MoE layers' experts, made while this one computes.
Out: the experts' gate / up / down matrices on the compute device, in the compute dtype, one
     expert at a time (so a provider with fewer cache slots than requested experts still works).

The model never owns routed-expert weights. `DenseExpertProvider` simply holds them all on the
device; the offloading runtime implements the same protocol on top of a compressed host store
and a bounded device cache, without the model code changing.

A provider may also hold a layer's experts stacked (`stacked`): one [S, expert_row_numel] tensor, each
row an expert's gate | up | down, the layout of the offload cache's slots, plus an expert → row map on
the device. The MoE block then computes every routed pair from device-side ids, with no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch

from moeserve.alignment import aligned_numel, ensure_aligned
from moeserve.huge_pages import weight_buffer
from moeserve.codecs.mxfp4 import Mxfp4Tensor


@dataclass(frozen=True)
class ExpertWeights:
    gate: torch.Tensor  # [I, D]
    up: torch.Tensor  # [I, D]
    down: torch.Tensor  # [D, I]
    # [2I, D] whose halves are `gate` and `up`, when they are stored that way: one matmul then
    # computes both, which at decode batch sizes saves a kernel launch per expert.
    gate_up: torch.Tensor | None = None

    @classmethod
    def fused(cls, gate_up: torch.Tensor, down: torch.Tensor) -> ExpertWeights:
        """Views of gate_up [2I, D] (gate rows, then up rows) and down [D, I]."""
        i = gate_up.shape[0] // 2
        return cls(gate=gate_up[:i], up=gate_up[i:], down=down, gate_up=gate_up)

    def to(self, device: torch.device, dtype: torch.dtype) -> ExpertWeights:
        """These weights on `device` in `dtype`, gate and up fused, every matrix a matmul reads starting
        64-byte aligned (alignment.py). A tensor already where, what and aligned as it must be is kept;
        another is copied."""
        down = ensure_aligned(self.down.to(device=device, dtype=dtype))
        if self.gate_up is not None:
            return ExpertWeights.fused(ensure_aligned(self.gate_up.to(device=device, dtype=dtype)), down)
        gate_up = torch.cat((self.gate, self.up)).to(device=device, dtype=dtype)  # [2I, D]
        return ExpertWeights.fused(ensure_aligned(gate_up), down)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))


@dataclass(frozen=True)
class Mxfp4ExpertWeights:
    """One expert as an MXFP4 checkpoint stores it (gpt_oss): gate [I, D], up [I, D], down [D, I] as
    blocks and scales. The host store keeps them as they are; resident loading dequantizes them."""

    gate: Mxfp4Tensor
    up: Mxfp4Tensor
    down: Mxfp4Tensor

    def dequantize(self, device: torch.device) -> ExpertWeights:
        """On `device`, in the tensors' dtype, decoded there, gate and up fused as in a cache slot."""
        gate_up = torch.cat((self.gate.dequantize(device), self.up.dequantize(device)))  # [2I, D]
        return ExpertWeights.fused(gate_up, self.down.dequantize(device))


@dataclass(frozen=True)
class StackedExperts:
    """One MoE layer's experts in rows of one tensor [S, expert_row_numel] (per row gate | up | down), as views."""

    gate_up: torch.Tensor  # [S, 2I, D] (row stride expert_row_numel)
    down: torch.Tensor  # [S, D, I] (row stride expert_row_numel)
    slot_of: torch.Tensor  # [E] long on the compute device: the row holding each expert

    @classmethod
    def over(cls, memory: torch.Tensor, intermediate: int, hidden: int, slot_of: torch.Tensor) -> StackedExperts:
        """Views of `memory` [S, expert_row_numel]."""
        return cls(*expert_rows(memory, intermediate, hidden), slot_of)

    def expert(self, row: int) -> ExpertWeights:
        """Row `row` as an expert (gate and up fused)."""
        return ExpertWeights.fused(self.gate_up[row], self.down[row])


def expert_row_numel(intermediate: int, hidden: int, dtype: torch.dtype) -> int:
    """Values in one row of stacked experts: three regions (gate, up, down) of I*D values each, rounded up
    to whole 64-byte alignments, so that in memory starting aligned every row and region does too."""
    return 3 * aligned_numel(intermediate * hidden, dtype)


def expert_rows(memory: torch.Tensor, intermediate: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """memory [S, expert_row_numel], each row an expert's gate | up | down → views gate_up [S, 2I, D] (from
    the gate region's start, up right after gate) and down [S, D, I] (the down region). The one layout of
    stacked resident experts and of the offload cache's slots."""
    rows, numel = memory.shape[0], intermediate * hidden
    down_start = 2 * aligned_numel(numel, memory.dtype)
    gate_up = memory[:, : 2 * numel].view(rows, 2 * intermediate, hidden)
    return gate_up, memory[:, down_start : down_start + numel].view(rows, hidden, intermediate)


def stack_experts(
    experts: Iterable[ExpertWeights], count: int, intermediate: int, hidden: int, device: torch.device, dtype: torch.dtype
) -> StackedExperts:
    """Copy `count` experts (any device, dtype and layout) into one stacked tensor on `device` in
    `dtype`, expert e in row e."""
    memory = weight_buffer((count, expert_row_numel(intermediate, hidden, dtype)), dtype, device)
    stacked = StackedExperts.over(memory, intermediate, hidden, torch.arange(count, device=device))
    for e, w in enumerate(experts):
        stacked.gate_up[e, :intermediate].copy_(w.gate)
        stacked.gate_up[e, intermediate:].copy_(w.up)
        stacked.down[e].copy_(w.down)
    return stacked


class ExpertProvider(Protocol):
    # How many MoE layers ahead the model predicts: after each layer's attention it calls `prefetch`
    # with its guess for each of the next `prediction_depth` MoE layers. 0: no predictions.
    prediction_depth: int

    def fetch(self, layer: int, experts: Sequence[int]) -> Iterable[tuple[int, ExpertWeights]]:
        """Yield each of `experts` (ascending ids) of MoE layer `layer` once, in any order; the
        weights of one item are valid until the next item is requested."""
        ...

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """A hint that `layer` will soon fetch `experts`; may be ignored."""
        ...

    def stacked(self, layer: int) -> StackedExperts | None:
        """Every expert of MoE layer `layer` on the device, stacked; None: reach them through `fetch`."""
        ...


class DenseExpertProvider:
    """All experts resident on the compute device: the uncompressed, unlimited-memory baseline.

    A layer is stacked (what the loader gives: its experts are views of the stack's rows, so it is held
    once), or held as a list of experts (`with_overrides`, which serves some experts from elsewhere)."""

    prediction_depth = 0

    def __init__(self, experts: dict[int, list[ExpertWeights]], stacked: dict[int, StackedExperts] | None = None):
        self._experts = experts  # layer id → experts in id order
        self._stacked = stacked or {}  # layer id → the same experts, stacked (for the layers that are)

    @classmethod
    def from_stacked(cls, stacked: dict[int, StackedExperts]) -> DenseExpertProvider:
        experts = {layer: [s.expert(row) for row in range(s.gate_up.shape[0])] for layer, s in stacked.items()}
        return cls(experts, stacked)

    def fetch(self, layer: int, experts: Sequence[int]) -> Iterable[tuple[int, ExpertWeights]]:
        table = self._experts[layer]
        return [(e, table[e]) for e in experts]

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        pass

    def stacked(self, layer: int) -> StackedExperts | None:
        return self._stacked.get(layer)

    def restacked(self) -> DenseExpertProvider:
        """This provider with every layer stacked (layers that are not get copied into rows): what a
        sync-free decode step needs."""
        if len(self._stacked) == len(self._experts):
            return self
        stacked = dict(self._stacked)
        for layer, table in self._experts.items():
            if layer not in stacked:
                down = table[0].down
                stacked[layer] = stack_experts(table, len(table), down.shape[1], down.shape[0], down.device, down.dtype)
        return DenseExpertProvider.from_stacked(stacked)

    def with_overrides(self, overrides: dict[tuple[int, int], ExpertWeights]) -> DenseExpertProvider:
        """A provider serving `overrides[(layer, expert)]` where given and this one's experts elsewhere
        (shared, not copied): how `moeserve bench` runs a model with some experts perturbed. Its layers
        are not stacked (an override lives outside the stack), so its MoE blocks take the host path."""
        unknown = [key for key in overrides if key[0] not in self._experts or not 0 <= key[1] < len(self._experts[key[0]])]
        if unknown:
            raise ValueError(f"no expert {unknown[0][1]} in MoE layer {unknown[0][0]}")
        return DenseExpertProvider({
            layer: [overrides.get((layer, e), w) for e, w in enumerate(table)] for layer, table in self._experts.items()
        })

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        return self._experts[layer][expert]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for layer in self._experts.values() for w in layer)
