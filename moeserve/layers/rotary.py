"""Rotary position embedding: a cos/sin table that grows on demand, and the three layouts of the
rotated dimensions the families use.

The table is built lazily on the device of the first call (models are constructed on the meta
device and filled by the loader, so nothing may be computed at construction time). Frequencies
and YaRN's correction follow transformers' rope initialisers number for number.
"""

import math

import torch

from moeserve.config_families import RopeConfig


class RotaryEmbedding:
    def __init__(self, rope: RopeConfig):
        self.rope = rope
        self._cos: torch.Tensor | None = None  # [P, rotary_dim] float32, or [P, rotary_dim / 2] for "complex"
        self._sin: torch.Tensor | None = None

    def _build(self, num_positions: int, device: torch.device) -> None:
        inv_freq = inverse_frequencies(self.rope).to(device)  # [rotary_dim / 2]
        positions = torch.arange(num_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, rotary_dim / 2]
        scale = self.rope.attention_factor
        if self.rope.layout == "complex":
            # deepseek_v2 rotates with complex products of a polar table; take that table's parts.
            cis = torch.polar(torch.ones_like(freqs), freqs) * scale  # [P, rotary_dim / 2] complex64
            self._cos, self._sin = torch.view_as_real(cis).unbind(-1)
            return
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, rotary_dim]
        self._cos, self._sin = angles.cos() * scale, angles.sin() * scale
        if self.rope.layout == "half":
            self._sin[:, : freqs.shape[-1]].neg_()  # rotate_half's negation, moved into the table (apply_rotary)

    def reserve(self, num_positions: int, device: torch.device) -> None:
        """Make the table cover positions 0..num_positions-1 on `device`. A captured CUDA graph reads
        the table where it was at capture, so the graph runner reserves the whole context first."""
        if self._cos is None or self._cos.shape[0] < num_positions or self._cos.device != device:
            self._build(max(num_positions, 2 * (self._cos.shape[0] if self._cos is not None else 128)), device)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, max_position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (none above the host-known `max_position`, so no device value is read back)
        → cos, sin [T, 1, width], ready to broadcast over heads: in `dtype`, except the "complex"
        layout's half-width tables, which stay float32 (that rotation runs in float32). The "half"
        layout's sin has its first half negated, as apply_rotary takes it."""
        self.reserve(max_position + 1, positions.device)
        if self.rope.layout == "complex":
            dtype = torch.float32
        cos = self._cos[positions].to(dtype).unsqueeze(1)
        sin = self._sin[positions].to(dtype).unsqueeze(1)
        return cos, sin


def inverse_frequencies(rope: RopeConfig) -> torch.Tensor:
    """[rotary_dim / 2] float32 rotation speeds, as transformers' default / linear / yarn initialisers."""
    dim = rope.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    pos_freqs = rope.theta**exponents  # [dim / 2]
    if rope.kind == "default":
        return 1.0 / pos_freqs
    if rope.kind == "linear":
        return 1.0 / pos_freqs / rope.factor
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rope.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1: keep the trained frequency, 0: interpolate it
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (x2, x1) along the last dim, in one copy."""
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """"half" layout. x [T, heads, head_dim], cos/sin [T, 1, rotary_dim] → x with its first rotary_dim
    dims rotated (all of them unless the rotary is partial, as in glm4_moe).

    transformers computes x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1). This table's sin has
    its first half negated (RotaryEmbedding), so (x2, x1) * sin gives the same products bit for bit
    (x2 * -s is -(x2 * s), as is -x2 * s) with one copy where rotate_half makes two (on a CPU each op of a
    step's size is a parallel region, see docs/kv-cache.md)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + _swap_halves(x) * sin
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos + _swap_halves(rotated) * sin, passed), dim=-1)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """"interleaved" layout (deepseek_v3): pairs (x0, x1), (x2, x3) … each turn by one angle; the
    result holds the rotated evens, then the rotated odds. x [T, heads, d], cos/sin [T, 1, d]."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]  # the table is cat(freqs, freqs): one angle per pair
    evens, odds = x[..., 0::2], x[..., 1::2]
    return torch.cat((evens * cos - odds * sin, odds * cos + evens * sin), dim=-1)


def apply_rotary_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """"complex" layout (deepseek_v2): pairs as complex numbers times the float32 polar table, the
    result in the same pair order and x's dtype. x [T, heads, d], cos/sin [T, 1, d/2] float32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [T, heads, d/2]
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)


ROTARY_LAYOUTS = {"half": apply_rotary, "interleaved": apply_rotary_interleaved, "complex": apply_rotary_complex}
