"""RMSNorm with the Hugging Face reference's rounding: statistics in float32, cast, then scale."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., size] → same shape and dtype
        # Written out rather than F.rms_norm: on CPU that decomposes into ~24 ops, this into ~6.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # The reference casts back before scaling; that order keeps bf16/fp16 results identical.
        return self.weight * x32.to(x.dtype)
