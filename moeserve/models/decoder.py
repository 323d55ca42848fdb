"""The decoder-only MoE transformer every supported family shares.

In:  token ids [T] of one step (any mix of sequences), its `StepContext`, an `ExpertProvider`,
     and which token positions need logits.
Out: float32 logits [N, vocab] for those positions.

Module and parameter names mirror the Hugging Face checkpoints (`model.layers.3.self_attn.q_proj`),
so the loader maps tensors by name. Routed experts are not parameters: each family only says
where its experts live in the checkpoint (`expert_tensor_names`) and the provider supplies them.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.config import ModelConfig
from moeserve.kv.context import DecodeContext, StepContext
from moeserve.experts import ExpertProvider
from moeserve.layers.attention import Attention
from moeserve.layers.mla import MlaAttention
from moeserve.layers.mlp import GatedMLP
from moeserve.layers.moe import MoeBlock
from moeserve.layers.norms import RMSNorm
from moeserve.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, moe_attr: str, moe_class: type[MoeBlock]):
        super().__init__()
        self.moe_attr = moe_attr
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_scale_in_float32)
        self.self_attn = MlaAttention(config, layer_id) if config.mla is not None else Attention(config, layer_id)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_scale_in_float32)
        if config.moe_layers[layer_id]:
            setattr(self, moe_attr, moe_class(config, layer_id))
        else:
            # Dense layers (qwen's mlp_only_layers / decoder_sparse_step, DeepSeek's and GLM's
            # first_k_dense_replace) are named `mlp`.
            self.mlp = GatedMLP(config.hidden_size, config.dense_intermediate_size, config.hidden_act, config.mlp_bias)
        self.is_moe = config.moe_layers[layer_id]

    def attend(self, x: torch.Tensor, rope, ctx: StepContext | DecodeContext) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), rope, ctx)

    def feed_forward(self, x: torch.Tensor, experts: ExpertProvider) -> torch.Tensor:
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            return x + getattr(self, self.moe_attr)(h, experts)
        return x + self.mlp(h)

    def predict_experts(self, x: torch.Tensor) -> list[int]:
        """This (MoE) layer's router applied to an earlier layer's hidden states x [T, D]."""
        return getattr(self, self.moe_attr).predict(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, moe_attr: str, moe_class: type[MoeBlock]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, moe_attr, moe_class) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_scale_in_float32)


class MoeCausalLM(nn.Module):
    """Base class of the families; subclasses name where their routed experts are stored."""

    moe_attr = "mlp"  # attribute (and checkpoint path segment) of the MoE block in a layer
    moe_class: type[MoeBlock] = MoeBlock  # the family's MoE block (its router and expert math)
    # Parameters (by name suffix) loaded in float32 whatever the compute dtype, as transformers keeps them.
    float32_parameters: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config, self.moe_attr, self.moe_class)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rope)
        moe_ids = config.moe_layer_ids
        # layer id → the MoE layers after it, nearest first (whose experts are worth prefetching)
        self.later_moe_layers = {i: [m for m in moe_ids if m > i] for i in range(config.num_layers)}

    @classmethod
    def expert_tensor_names(cls, layer: int, expert: int) -> tuple[str, str, str]:
        """Checkpoint names of (gate, up, down) of one routed expert."""
        prefix = f"model.layers.{layer}.{cls.moe_attr}.experts.{expert}"
        return f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"

    @classmethod
    def fused_expert_tensor_names(cls, layer: int) -> tuple[str, str]:
        """Names of the stacked layout some exporters write: gate_up [E, 2I, D] and down [E, D, I]."""
        prefix = f"model.layers.{layer}.{cls.moe_attr}.experts"
        return f"{prefix}.gate_up_proj", f"{prefix}.down_proj"

    @classmethod
    def stored_layer_experts(cls, read, layer: int, config: ModelConfig, keep_mxfp4: bool) -> list | None:
        """One MoE layer's experts in a family's own checkpoint layout, each tensor taken through
        `read(name, expected shape)`; None: the default layouts above (see loader.iter_stored_experts)."""
        return None

    @classmethod
    def keeps_float32(cls, name: str) -> bool:
        return name.endswith(cls.float32_parameters)

    def moe_block(self, layer: int) -> MoeBlock:
        return getattr(self.model.layers[layer], self.moe_attr)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        ctx: StepContext | DecodeContext,
        experts: ExpertProvider,
        logits_indices: torch.Tensor | None = None,  # [N]; None = every position
    ) -> torch.Tensor:
        # inference_mode skips autograd's bookkeeping on every op (8% of a small batch-1 decode step on
        # a CPU), but torch.compile cannot functionalize the KV cache writes made under it: compiled, no_grad
        with torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode():
            return self._forward(input_ids, ctx, experts, logits_indices)

    def _forward(self, input_ids, ctx, experts, logits_indices) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, D]
        rope = self.rotary.cos_sin(ctx.positions, x.dtype, ctx.max_position)
        layers = self.model.layers
        for i, layer in enumerate(layers):
            x = layer.attend(x, rope, ctx)
            for upcoming in self.later_moe_layers[i][: experts.prediction_depth]:
                # While this layer's experts compute, each upcoming MoE layer's router on the current
                # hidden states names the experts worth loading ahead of time.
                experts.prefetch(upcoming, layers[upcoming].predict_experts(x))
            x = layer.feed_forward(x, experts)
        if logits_indices is not None:
            x = x[logits_indices]  # [N, D]: the vocabulary projection only where it is needed
        return self.lm_head(self.model.norm(x)).float()  # [N, vocab]
