"""RMSNorm, computed in float32 and cast back, exactly as the Hugging Face reference does."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., size] → same shape and dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # The reference casts back before scaling; doing it in that order keeps bf16 results identical.
        return self.weight * x32.to(x.dtype)
