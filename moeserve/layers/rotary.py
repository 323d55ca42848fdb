"""Rotary position embedding with a cos/sin table that grows on demand.

The table is built lazily on the device of the first call (models are constructed on the meta
device and filled by the loader, so nothing may be computed at construction time).
"""

import math

import torch

from moeserve.config import YarnRope


class RotaryEmbedding:
    def __init__(self, head_dim: int, theta: float, linear_factor: float = 1.0, yarn: YarnRope | None = None):
        self.head_dim = head_dim
        self.theta = theta
        self.linear_factor = linear_factor
        self.yarn = yarn
        self._cos: torch.Tensor | None = None  # [P, head_dim] float32
        self._sin: torch.Tensor | None = None

    def _build(self, num_positions: int, device: torch.device) -> None:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        if self.yarn is None:
            inv_freq, scale = 1.0 / (self.theta**exponents) / self.linear_factor, 1.0  # [head_dim / 2]
        else:
            inv_freq, scale = _yarn_inv_freq(self.theta**exponents, self.head_dim, self.theta, self.yarn)
        positions = torch.arange(num_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, head_dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, head_dim]
        self._cos, self._sin = angles.cos(), angles.sin()
        if scale != 1.0:
            self._cos, self._sin = self._cos * scale, self._sin * scale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] → cos, sin [T, 1, head_dim] in `dtype`, ready to broadcast over heads."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        if self._cos is None or self._cos.shape[0] < needed or self._cos.device != positions.device:
            self._build(max(needed, 2 * (self._cos.shape[0] if self._cos is not None else 256)), positions.device)
        cos = self._cos[positions].to(dtype).unsqueeze(1)
        sin = self._sin[positions].to(dtype).unsqueeze(1)
        return cos, sin


def _yarn_inv_freq(pos_freqs: torch.Tensor, dim: int, base: float, yarn: YarnRope) -> tuple[torch.Tensor, float]:
    """YaRN as transformers computes it: per dimension, a ramp between the interpolated (divided by
    `factor`) and the original frequency; returns inv_freq [dim / 2] and the cos/sin scale."""

    def correction_dim(rotations: float) -> float:
        wavelengths = yarn.original_max_position_embeddings / (rotations * 2 * math.pi)
        return (dim * math.log(wavelengths)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(pos_freqs.device)
    extrapolation = 1 - ramp  # [dim / 2]: 1 keeps the original frequency
    inv_freq = (1.0 / (yarn.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, yarn.attention_factor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim], cos/sin [T, 1, head_dim] → rotated x, same shape."""
    return x * cos + _rotate_half(x) * sin
