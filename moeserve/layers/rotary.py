"""Rotary position embedding with a cos/sin table that grows on demand.

The table is built lazily on the device of the first call (models are constructed on the meta
device and filled by the loader, so nothing may be computed at construction time).
"""

import torch


class RotaryEmbedding:
    def __init__(self, head_dim: int, theta: float, linear_factor: float = 1.0):
        self.head_dim = head_dim
        self.theta = theta
        self.linear_factor = linear_factor
        self._cos: torch.Tensor | None = None  # [P, head_dim] float32
        self._sin: torch.Tensor | None = None

    def _build(self, num_positions: int, device: torch.device) -> None:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents) / self.linear_factor  # [head_dim / 2]
        positions = torch.arange(num_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, head_dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, head_dim]
        self._cos, self._sin = angles.cos(), angles.sin()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] → cos, sin [T, 1, head_dim] in `dtype`, ready to broadcast over heads."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        if self._cos is None or self._cos.shape[0] < needed or self._cos.device != positions.device:
            self._build(max(needed, 2 * (self._cos.shape[0] if self._cos is not None else 256)), positions.device)
        cos = self._cos[positions].to(dtype).unsqueeze(1)
        sin = self._sin[positions].to(dtype).unsqueeze(1)
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim], cos/sin [T, 1, head_dim] → rotated x, same shape."""
    return x * cos + _rotate_half(x) * sin
