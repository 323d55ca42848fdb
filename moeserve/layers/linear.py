"""A dense linear layer that runs decode-sized CPU products on the CPU GEMM kernel.

In:  x [..., Din]; the layer's weight [Dout, Din] and optional bias [Dout].
Out: [..., Dout] in x's dtype.

On a CPU, for at most GROUPED_GEMM_MAX_TOKENS rows (x's leading dims flattened), in bfloat16, without a bias,
with the extension built and no autograd to record: the CPU kernel (cpu_gemm.cpu_linear), which streams the
weight once at memory bandwidth (torch's bfloat16 products on a CPU without AMX or AVX-512-BF16 reach about
half of it: bench/cpu_gemm.py). Anything else: F.linear. Float32 stays with BLAS, which is at the bandwidth
bound for a decode step's rows already and which a compiled step calls without a Python op; a bfloat16 layer
with a bias stays with F.linear because the kernel rounds its sums to bfloat16 before a bias could join
them (a second rounding, which moved gpt_oss's bf16 logits past the parity tolerance). The model's dense
layers (attention projections, dense MLPs, shared experts, the vocabulary projection) are built as `Linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.layers import cpu_gemm
from moeserve.layers.grouped_gemm import GROUPED_GEMM_MAX_TOKENS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the CPU kernel where it applies (see the module docstring)."""
    if bias is None and uses_kernel(x, weight):
        k_dim = x.shape[-1]
        return cpu_gemm.cpu_linear(x.reshape(-1, k_dim), weight).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` runs x @ weight.T on the CPU kernel."""
    if not (x.is_cpu and weight.is_cpu and weight.dtype == x.dtype == torch.bfloat16 and cpu_gemm.available(x.dtype)):
        return False
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.shape[-1] == 0:
        return False
    if not cpu_gemm.contiguous_matrix(weight):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False  # the kernel records no gradient
    return x.numel() // x.shape[-1] <= GROUPED_GEMM_MAX_TOKENS  # rows


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
