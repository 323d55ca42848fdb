"""The one narrow interface through which MoE blocks get their expert weights.

In:  (layer id, sorted expert ids) from the MoE block of that layer, once per forward step.
Out: the experts' gate / up / down matrices on the compute device, in the compute dtype.

The model never owns routed-expert weights. `DenseExpertProvider` simply holds them all on the
device; the offloading runtime implements the same protocol on top of a compressed host store
and a bounded device cache, without the model code changing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


@dataclass(frozen=True)
class ExpertWeights:
    gate: torch.Tensor  # [I, D]
    up: torch.Tensor  # [I, D]
    down: torch.Tensor  # [D, I]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))


class ExpertProvider(Protocol):
    def fetch(self, layer: int, experts: Sequence[int]) -> Sequence[ExpertWeights]:
        """Weights of `experts` (ascending ids) of MoE layer `layer`, valid until the next `fetch`."""
        ...


class DenseExpertProvider:
    """All experts resident on the compute device: the uncompressed, unlimited-memory baseline."""

    def __init__(self, experts: dict[int, list[ExpertWeights]]):
        self._experts = experts  # layer id → experts in id order

    def fetch(self, layer: int, experts: Sequence[int]) -> list[ExpertWeights]:
        table = self._experts[layer]
        return [table[e] for e in experts]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for layer in self._experts.values() for w in layer)
