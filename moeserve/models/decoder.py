"""The decoder-only MoE transformer every supported family shares.

In:  token ids [T] of one step (any mix of sequences), its `StepContext` or `DecodeContext`, an
     `ExpertProvider`, and which token positions need logits.
Out: float32 logits [N, vocab] for those positions.

Module and parameter names mirror the Hugging Face checkpoints (`model.layers.3.self_attn.q_proj`),
so the loader maps tensors by name. Routed experts are not parameters: each family only says
where its experts live in the checkpoint (`expert_tensor_names`) and the provider supplies them.

A forward pass is a chain of segments cut at the routed experts (`segment`): segment j runs every layer
after MoE layer j-1 up to MoE layer j's routing and shared expert (the first starts at the embedding, the
last ends at the logits), and MoE layer j's routed experts run between segments j and j+1. The routed
experts are the one part of a step an offloading provider must see from the host (which experts to
load), so engine/segment_graphs.py replays each segment from a CUDA graph and runs only them eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeserve.config import ModelConfig
from moeserve.kv.context import DecodeContext, StepContext
from moeserve.experts import ExpertProvider
from moeserve.layers.attention import Attention
from moeserve.layers.linear import Linear
from moeserve.layers.mla import MlaAttention
from moeserve.layers.mlp import GatedMLP
from moeserve.layers.moe import MoeBlock, expert_slots, held_stack, host_routed_experts, prefetch
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

    def attend(self, x: torch.Tensor, rope, ctx: StepContext | DecodeContext) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), rope, ctx)

    def dense_feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A dense layer's MLP block (an MoE layer's is split across segments, see MoeCausalLM.segment)."""
        return x + self.mlp(self.post_attention_layernorm(x))

    def predicted_ids(self, x: torch.Tensor) -> torch.Tensor:
        """This (MoE) layer's router applied to an earlier layer's hidden states x [T, D] → expert ids [T, K]."""
        return getattr(self, self.moe_attr).router_module.select(self.post_attention_layernorm(x))


@dataclass
class Segment:
    """What a segment hands on (see the module docstring); tensors stay on the device."""

    x: torch.Tensor  # [T, D] residual stream after the MoE layer's attention; the last segment: logits [N, V]
    rope: tuple[torch.Tensor, torch.Tensor]  # the step's rotary tables, made once in segment 0
    # (MoE layer, its router's choice [T, K] on this segment's hidden states), in the order they were made
    predictions: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    h: torch.Tensor | None = None  # [T, D] the MoE layer's normed input
    weights: torch.Tensor | None = None  # [T, K] routing weights
    ids: torch.Tensor | None = None  # [T, K] routed expert ids
    shared: torch.Tensor | None = None  # [T, D] shared-expert output, None for families without one


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
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rope)
        moe_ids = self.moe_layer_ids = config.moe_layer_ids
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
        depth = experts.prediction_depth
        done = self.segment(0, input_ids, ctx, depth, logits_indices=logits_indices)  # (the last, without MoE layers)
        for index, layer in enumerate(self.moe_layer_ids):
            if torch.compiler.is_compiling() and experts.stacked(layer) is None:
                # compiled (engine/compiled_decode.py): the host's part of the layer runs in one opaque op, which
                # either names the slots holding the routed experts (computed here, like stacked experts) or
                # computes the routed experts itself
                predicted_layers, predicted = [u for u, _ in done.predictions], [p for _, p in done.predictions]
                block = self.moe_block(layer)
                stack = held_stack(experts, layer, input_ids.shape[0], block.top_k)
                if stack is not None:
                    slots = expert_slots(experts, done.ids, layer, predicted, predicted_layers)  # [T, K]
                    routed = block.on_stack(done.h, done.weights, done.ids, stack, slots)
                else:
                    routed = host_routed_experts(done.h, done.weights, done.ids, layer, predicted, predicted_layers)
            else:
                prefetch(experts, done.predictions, input_ids.shape[0])
                routed = self.moe_block(layer).routed(done.h, done.weights, done.ids, experts)  # [T, D]
            done = self.segment(index + 1, input_ids, ctx, depth, done, routed, logits_indices)
        return done.x

    def segment(
        self,
        index: int,
        input_ids: torch.Tensor,  # [T]
        ctx: StepContext | DecodeContext,
        depth: int,
        previous: Segment | None = None,
        routed: torch.Tensor | None = None,  # [T, D] MoE layer index-1's routed experts, given the previous segment
        logits_indices: torch.Tensor | None = None,  # [N], last segment only; None = every position
    ) -> Segment:
        """Segment `index` (0 .. number of MoE layers); `depth`: MoE layers ahead each layer predicts."""
        layers, moe_ids = self.model.layers, self.moe_layer_ids
        if previous is None:
            x = self.model.embed_tokens(input_ids)  # [T, D]
            rope = self.rotary.cos_sin(ctx.positions, x.dtype, ctx.max_position)
            first = 0
        else:
            moe_out = routed if previous.shared is None else routed + previous.shared  # [T, D]: the MoE block's output
            x, rope, first = previous.x + moe_out, previous.rope, moe_ids[index - 1] + 1
        last = moe_ids[index] if index < len(moe_ids) else len(layers) - 1
        done = Segment(x, rope)
        for i in range(first, last + 1):
            layer = layers[i]
            x = layer.attend(x, rope, ctx)
            # While this layer's experts compute, each upcoming MoE layer's router on the current hidden
            # states names the experts worth loading ahead of time.
            done.predictions += [(u, layers[u].predicted_ids(x)) for u in self.later_moe_layers[i][:depth]]
            if index < len(moe_ids) and i == last:
                block = self.moe_block(i)
                done.x, done.h = x, layer.post_attention_layernorm(x)
                done.weights, done.ids = block.route(done.h)
                done.shared = block.shared(done.h)
                return done
            x = layer.dense_feed_forward(x)
        if logits_indices is not None:
            x = x[logits_indices]  # [N, D]: the vocabulary projection only where it is needed
        done.x = self.lm_head(self.model.norm(x)).float()  # [N, vocab]
        return done

