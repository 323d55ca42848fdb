"""A compressed store of random experts, for the provider and pipeline tests that need no model."""

from __future__ import annotations

import torch

from moeserve.experts import ExpertWeights
from moeserve.offload.policy import load_policy
from moeserve.offload.store import CompressedStore


def random_store(
    layers: int, experts: int, hidden: int, intermediate: int, policy: dict, dtype: torch.dtype = torch.float32,
) -> CompressedStore:
    """`layers` MoE layers of `experts` experts ([I, D] gate and up, [D, I] down) stored in `dtype`, seeded, encoded by
    `policy`."""
    generator = torch.Generator().manual_seed(0)
    shapes = ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))

    def stored():
        for layer in range(layers):
            weights = [ExpertWeights(*(torch.randn(shape, generator=generator).to(dtype) for shape in shapes))
                       for _ in range(experts)]
            yield layer, weights

    loaded = load_policy(policy)
    resolved = loaded.resolve(list(range(layers)), layers, experts)
    return CompressedStore.build(stored(), resolved, loaded.to_yaml(), layers * experts, progress=False)
