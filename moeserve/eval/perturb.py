"""Compress (or noise) chosen experts of a loaded model, for `moeserve bench` and `moeserve tune`.

In:  an `LLM` holding its experts uncompressed (a DenseExpertProvider), the checkpoint's stored
     experts (stored dtype), and a `Perturbation` applied to a set of (layer, expert) pairs.
Out: a DenseExpertProvider serving decode(encode(stored weights)) for those experts, exactly what the
     offloading runtime would serve under that setting, the others untouched; plus what the encoding
     measured: compressed bytes, values, bits/value and the largest error relative to the bound.
CPU only, the LLM's own experts are never modified; run the LLM in float32 so the decoded values reach
the model without a second rounding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import torch

from moeserve import codecs
from moeserve.codecs.bounds import resolve as resolve_bound
from moeserve.experts import DenseExpertProvider, ExpertWeights
from moeserve.loader import iter_stored_experts
from moeserve.offload.policy_resolve import PROJECTIONS

GAUSSIAN = "gaussian"  # the stand-in of arXiv 2509.07727: N(0, eb) noise instead of a codec
BASELINE = "none"  # the uncompressed model: no expert perturbed


@dataclass(frozen=True)
class Perturbation:
    """What happens to each chosen expert tensor. codec is a codec name or GAUSSIAN; mode and
    error_bound are None for unbounded codecs (raw, int8, int4)."""

    codec: str
    mode: str | None = None
    error_bound: float | None = None

    @property
    def bounded(self) -> bool:
        return self.error_bound is not None

    def label(self) -> str:
        return self.codec if not self.bounded else f"{self.codec} {self.mode} {self.error_bound:g}"


@dataclass
class EncodingStats:
    values: int = 0
    compressed_bytes: int | None = 0  # None under GAUSSIAN: nothing is stored
    max_error_over_bound: float | None = None  # None for unbounded codecs

    @property
    def bits_per_value(self) -> float | None:
        if self.compressed_bytes is None or not self.values:
            return None
        return 8 * self.compressed_bytes / self.values

    def add(self, other: EncodingStats) -> None:
        self.values += other.values
        if self.compressed_bytes is not None and other.compressed_bytes is not None:
            self.compressed_bytes += other.compressed_bytes
        else:
            self.compressed_bytes = None
        if other.max_error_over_bound is not None:
            self.max_error_over_bound = max(self.max_error_over_bound or 0.0, other.max_error_over_bound)


class ExpertPerturber:
    """Perturbs experts of one LLM; remembers the last setting's results so that layer groups run one
    after another (shallow, middle, deep, all) encode each expert once per setting."""

    def __init__(self, llm):
        if llm.offload is not None:
            raise ValueError("perturbing experts needs an LLM holding them uncompressed (no policy, no expert cache)")
        self.llm = llm
        self.base: DenseExpertProvider = llm.experts
        self.compute_dtype = llm.config.dtype
        self.stored = {layer: experts for layer, experts in iter_stored_experts(llm.model, llm.loaded.checkpoint, llm.config)}
        self._memo_setting: Perturbation | None = None
        self._memo: dict[tuple[int, int], tuple[ExpertWeights, EncodingStats]] = {}

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(self.llm.config.moe_layer_ids)

    @property
    def num_experts(self) -> int:
        return self.llm.config.num_experts

    def raw_bytes(self, layer: int, expert: int) -> int:
        """Bytes of one expert as the checkpoint stores it (the uncompressed baseline of bits/value)."""
        return self.stored[layer][expert].nbytes

    def provider(self, setting: Perturbation, pairs: Iterable[tuple[int, int]]) -> tuple[DenseExpertProvider, EncodingStats]:
        if setting != self._memo_setting:
            self._memo_setting, self._memo = setting, {}
        total = EncodingStats()
        overrides = {}
        for pair in pairs:
            if pair not in self._memo:
                self._memo[pair] = self._perturb(setting, *pair)
            overrides[pair], stats = self._memo[pair]
            total.add(stats)
        return self.base.with_overrides(overrides), total

    def _perturb(self, setting: Perturbation, layer: int, expert: int) -> tuple[ExpertWeights, EncodingStats]:
        stored = self.stored[layer][expert]
        stats = EncodingStats()
        out = {}
        for name in PROJECTIONS:
            original = getattr(stored, name)  # stored dtype, CPU
            if setting.codec == GAUSSIAN:
                decoded, tensor_stats = _gaussian(original, setting, (layer, expert, name))
            else:
                decoded, tensor_stats = _round_trip(original, setting)
            out[name] = decoded
            stats.add(tensor_stats)
        # Fused like the loader's experts, so an unperturbed round trip computes bit for bit alike.
        return ExpertWeights(out["gate"], out["up"], out["down"]).to(self.llm.device, self.compute_dtype), stats


def _round_trip(original: torch.Tensor, setting: Perturbation) -> tuple[torch.Tensor, EncodingStats]:
    blob = codecs.encode(original, setting.codec, setting.mode or "abs", setting.error_bound)
    decoded = codecs.decode(blob).float()
    ratio = None
    if setting.bounded:
        error = (decoded - original.float()).abs().max().item()
        ratio = error / blob.abs_bound if blob.abs_bound > 0 else 0.0  # bound 0: stored losslessly
    return decoded, EncodingStats(original.numel(), blob.nbytes, ratio)


def _gaussian(original: torch.Tensor, setting: Perturbation, key: tuple) -> tuple[torch.Tensor, EncodingStats]:
    x = original.float()
    sigma = resolve_bound(setting.mode, setting.error_bound, x)
    # One fixed stream per tensor: a configuration's noise does not depend on which others ran before.
    seed = int.from_bytes(hashlib.sha256(repr((key, setting)).encode()).digest()[:8], "little")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    ratio = noise.abs().max().item() / sigma if sigma > 0 else 0.0
    return x + noise, EncodingStats(original.numel(), None, ratio)
