"""gpt-oss: attention sinks, alternating sliding-window / full layers, YaRN, biased routers and
experts with a clamped SwiGLU, and experts that may ship as MXFP4.

Attention, norms and rope read their switches from `ModelConfig` (layers/sinks.py holds the sink
softmax). This file holds what is gpt_oss's alone:

- The router's checkpoint name, `router` (its rule, top-k of biased logits then a softmax over
  those k, is layers/routing.py's BiasedTopKSoftmaxRouter).
- The expert math, as transformers' GptOssExperts: gate_up = h W + b, then gate = min(gate, limit),
  up = clamp(up, -limit, limit), out = ((up + 1) * gate * sigmoid(alpha * gate)) W_down + b_down.
  Its bias and activation steps (`_activate`, `_finish`) take one expert id or an id per row, so the
  block's host path and its device path (layers/moe.py) run them alike, resident or offloaded.
- The checkpoint layout. transformers 5 stores one tensor per layer: gate_up_proj [E, D, 2I] with
  gate and up interleaved on the last dimension (gate at even, up at odd columns), down_proj
  [E, I, D], and their biases [E, 2I] and [E, D]; MXFP4 checkpoints store gate_up_proj_blocks
  [E, 2I, D/32, 16] / _scales [E, 2I, D/32] and down_proj_blocks [E, D, I/32, 16] / _scales
  [E, D, I/32]. The loader gets each expert as the common gate [I, D], up [I, D], down [D, I]
  (for MXFP4 the rows of gate and up are picked without decoding: blocks run along D).

The biases stay resident in the MoE block (parameters [E, 2I] and [E, D], as stored): they are
(2I + D) / (3ID) of an expert's values (0.03% for gpt-oss-20b), so offloading them would save
nothing, and keeping them out of the provider leaves the store, the codecs, the policies and the
cache slots with three matrices per expert, as for every other family. Being resident, they are
never compressed either: a lossy policy perturbs the matrices only.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moeserve.codecs.mxfp4 import BLOCK, Mxfp4Tensor
from moeserve.config import ModelConfig
from moeserve.experts import ExpertWeights, Mxfp4ExpertWeights
from moeserve.layers.moe import MoeBlock
from moeserve.models.decoder import MoeCausalLM

# Legend: T = tokens, D = hidden size, E = routed experts, I = expert intermediate size, K = experts per token.


class GptOssExpertBiases(nn.Module):
    """The checkpoint's `mlp.experts.*_bias` tensors, kept resident."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, d, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * i), requires_grad=False)  # gate even, up odd
        self.down_proj_bias = nn.Parameter(torch.empty(e, d), requires_grad=False)


class GptOssMoeBlock(MoeBlock):
    router_attr = "router"  # the checkpoint's `mlp.router.weight` / `.bias` (config.router: biased_topk_softmax)

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__(config, layer_id)
        self.experts = GptOssExpertBiases(config)
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def _activate(self, gate: torch.Tensor, up: torch.Tensor, expert: int | torch.Tensor) -> torch.Tensor:
        bias = self.experts.gate_up_proj_bias[expert]  # [2I] or [n, 2I], interleaved
        gate = (gate + bias[..., 0::2]).clamp(min=None, max=self.limit)
        up = (up + bias[..., 1::2]).clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return (up + 1) * glu

    def _finish(self, y: torch.Tensor, expert: int | torch.Tensor) -> torch.Tensor:
        return y + self.experts.down_proj_bias[expert]


Reader = Callable[[str, tuple[int, ...]], torch.Tensor]  # (name, expected shape) → the stored tensor


class GptOssForCausalLM(MoeCausalLM):
    moe_attr = "mlp"
    moe_class = GptOssMoeBlock

    @classmethod
    def stored_layer_experts(
        cls, read: Reader, layer: int, config: ModelConfig, keep_mxfp4: bool
    ) -> list[ExpertWeights] | list[Mxfp4ExpertWeights]:
        e, d, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        prefix = f"model.layers.{layer}.mlp.experts"
        if config.expert_quantization == "mxfp4":
            gu_blocks = read(f"{prefix}.gate_up_proj_blocks", (e, 2 * i, d // BLOCK, BLOCK // 2))
            gu_scales = read(f"{prefix}.gate_up_proj_scales", (e, 2 * i, d // BLOCK))
            down_blocks = read(f"{prefix}.down_proj_blocks", (e, d, i // BLOCK, BLOCK // 2))
            down_scales = read(f"{prefix}.down_proj_scales", (e, d, i // BLOCK))
            experts = [
                Mxfp4ExpertWeights(
                    gate=Mxfp4Tensor(gu_blocks[x, 0::2], gu_scales[x, 0::2], config.dtype),  # [I, D]
                    up=Mxfp4Tensor(gu_blocks[x, 1::2], gu_scales[x, 1::2], config.dtype),  # [I, D]
                    down=Mxfp4Tensor(down_blocks[x], down_scales[x], config.dtype),  # [D, I]
                )
                for x in range(e)
            ]
            return experts if keep_mxfp4 else [w.dequantize(torch.device("cpu")) for w in experts]
        gate_up = read(f"{prefix}.gate_up_proj", (e, d, 2 * i))  # [E, D, 2I]
        down = read(f"{prefix}.down_proj", (e, i, d))  # [E, I, D]
        # Copied into the cache slots' layout (gate rows then up rows, [2I, D]; down [D, I]), so that
        # resident experts run the very matmuls a slot runs.
        return [
            ExpertWeights.fused(torch.cat((gate_up[x, :, 0::2].T, gate_up[x, :, 1::2].T)), down[x].T.contiguous())
            for x in range(e)
        ]
