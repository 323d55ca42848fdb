"""RMSNorm with the Hugging Face reference's rounding: statistics in float32, cast, then scale."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., size] → same shape and dtype
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # Nothing to cast: one fused op computes the same expression.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # The reference casts back before scaling; that order keeps bf16/fp16 results identical.
        return self.weight * x32.to(x.dtype)
