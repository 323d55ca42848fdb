"""The gated MLP used by dense layers and shared experts, and the activation table."""

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.layers.linear import Linear

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _gated_activation(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    return ACTIVATIONS[act](gate) * up


# act(gate) * up as one opaque op (csrc/torch_ops.cpp has its C++ twin, moeserve_native::gated_activation): a
# compiled step that calls it runs torch's eager kernels, as the eager path does, not inductor's own code
_library = torch.library.Library("moeserve", "FRAGMENT")
_library.define("gated_activation(Tensor gate, Tensor up, str act) -> Tensor")
_library.impl("gated_activation", _gated_activation, "CPU")
torch.library.register_fake("moeserve::gated_activation", lambda gate, up, act: gate.new_empty(gate.shape), lib=_library)


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] → [T, D]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
