"""RMSNorm, computed in float32 and cast back, exactly as the Hugging Face reference does."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., size] → same shape and dtype
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        # The reference casts back before scaling; doing it in that order keeps bf16 results identical.
        return self.weight * normed.to(x.dtype)
