"""The sparse MoE block: router → top-k → experts fetched through the expert provider.

In:  hidden states [T, D] of every token in the step (any mix of sequences).
Out: [T, D], the routing-weighted sum of each token's top-k experts (+ the gated shared expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.config import ModelConfig
from moeserve.experts import ExpertProvider
from moeserve.layers.mlp import ACTIVATIONS, GatedMLP

# Legend: T = tokens in the step, D = hidden size, E = routed experts, K = experts per token.


class MoeBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.top_k = config.top_k
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.routing_weights_in_float32 = config.routing_weights_in_float32
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size, config.hidden_act)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] → (weights [T, K], expert ids [T, K])."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.routing_weights_in_float32:
            weights = weights.to(x.dtype)
        return weights, ids

    def forward(self, x: torch.Tensor, experts: ExpertProvider) -> torch.Tensor:
        weights, ids = self.route(x)
        # Group the T*K (token, slot) pairs by expert with one sort, so the step syncs with the
        # host once (for the counts) instead of once per expert.
        flat_ids = ids.flatten()  # [T*K]
        order = torch.argsort(flat_ids, stable=True)  # [T*K]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        used = [e for e, c in enumerate(counts) if c]
        token_of = order // self.top_k  # [T*K] token index of each sorted pair
        weight_of = weights.flatten()[order]  # [T*K]

        out = torch.zeros_like(x)
        start = 0
        for expert_id, w in zip(used, experts.fetch(self.layer_id, used)):
            end = start + counts[expert_id]
            tokens = token_of[start:end]
            h = x[tokens]  # [n, D]
            y = F.linear(self.act(F.linear(h, w.gate)) * F.linear(h, w.up), w.down)  # [n, D]
            # index_put_ with accumulate: same sum as index_add_, without index_add_'s large fixed
            # cost on CPU for small index sets (milliseconds per call in torch 2.13).
            out.index_put_((tokens,), (y * weight_of[start:end, None]).to(x.dtype), accumulate=True)
            start = end

        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
