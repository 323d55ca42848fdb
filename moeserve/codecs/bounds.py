"""Error-bound modes, resolved to one absolute bound at encode time.

- abs:      eb
- rel:      eb x (max - min) of the tensor (SZ3's REL)
- mean_abs: eb x mean |w| of the tensor (the convention of arXiv 2509.07727)

The resolved value is what the codec guarantees and what the Blob records as abs_bound. It is 0 for a
constant tensor under rel and an all-zero tensor under mean_abs: the codecs then store the tensor losslessly.
"""

from __future__ import annotations

import math

import torch

from moeserve.codecs.base import CodecError

MODES = ("abs", "rel", "mean_abs")


def resolve(mode: str, error_bound: float, x: torch.Tensor) -> float:
    """Absolute bound for tensor x (finite, any float dtype); statistics are taken in float64."""
    if mode not in MODES:
        raise CodecError(f"unknown error-bound mode {mode!r}; use one of {', '.join(MODES)}.")
    if isinstance(error_bound, bool) or not isinstance(error_bound, (int, float)):
        raise CodecError(f"error_bound must be a number, got {error_bound!r}; pass e.g. error_bound=1e-3.")
    if not (math.isfinite(error_bound) and error_bound > 0):
        raise CodecError(f"error_bound must be a finite number above 0, got {error_bound!r}.")
    if mode == "abs":
        return float(error_bound)
    if x.numel() == 0:  # nothing to bound; max/min/mean of nothing are undefined
        return 0.0
    if mode == "rel":  # max and min are exact in x's dtype; only their difference needs float64
        scale = x.max().double().item() - x.min().double().item()
    else:
        scale = x.abs().mean(dtype=torch.float64).item()
    return float(error_bound) * scale
