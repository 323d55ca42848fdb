"""Routers: a MoE layer's hidden states → which experts each token uses, and with what weight.

In:  hidden states [T, D] after the post-attention norm.
Out: `forward`: (weights [T, K], expert ids [T, K]); `select`: just the ids, for prefetch predictions.

One class per routing rule (config_families.RouterConfig.kind). The MoE block registers each under
the checkpoint's name for the router (`gate`, or gpt_oss's `router`), so its parameters load by name
(`mlp.gate.weight`, `mlp.gate.e_score_correction_bias`, `mlp.router.bias`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.config import ModelConfig

# Legend: T = tokens, D = hidden size, E = routed experts, K = experts per token, G = expert groups.


class SoftmaxRouter(nn.Module):
    """mixtral / qwen / olmoe: softmax over logits computed in the activation dtype, top-k,
    optionally renormalised."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size), requires_grad=False)
        self.top_k = config.top_k
        self.norm_topk_prob = config.norm_topk_prob
        self.weights_in_float32 = config.routing_weights_in_float32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.weights_in_float32:
            weights = weights.to(x.dtype)
        return weights, ids

    def select(self, x: torch.Tensor) -> torch.Tensor:
        # softmax is monotonic, so the top-k of the logits are the same ids
        return torch.topk(F.linear(x, self.weight), self.top_k, dim=-1).indices  # [T, K]


class DeepseekV2Router(nn.Module):
    """deepseek_v2: float32 softmax scores; top-k over all experts ("greedy") or only over the
    topk_group groups whose best expert scores highest ("group_limited"); times routed_scaling_factor.
    Weights stay float32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # The router is kept in float32 whatever the compute dtype (the loader sees `keeps_float32`).
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size), requires_grad=False)
        self.top_k = config.top_k
        self.group_limited = config.router.kind == "softmax_group_limited"
        self.n_group, self.topk_group = config.router.n_group, config.router.topk_group
        self.scaling = config.router.routed_scaling_factor

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1, dtype=torch.float32)  # [T, E]
        if self.group_limited:
            group_best = scores.view(x.shape[0], self.n_group, -1).max(dim=-1).values  # [T, G]
            scores = scores.masked_fill(~_group_mask(group_best, self.topk_group, scores.shape[-1]), 0.0)
        return scores

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = torch.topk(self._scores(x), self.top_k, dim=-1, sorted=False)  # [T, K]
        return weights * self.scaling, ids

    def select(self, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(self._scores(x), self.top_k, dim=-1, sorted=False).indices


class SigmoidGroupedRouter(nn.Module):
    """deepseek_v3 / glm4_moe: float32 sigmoid scores. The choice adds e_score_correction_bias and
    keeps the topk_group groups with the highest sum of their two best biased scores; the weights are
    the unbiased scores of the chosen experts, renormalised (norm_topk_prob), times routed_scaling_factor."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(config.num_experts), requires_grad=False)
        self.top_k = config.top_k
        self.n_group, self.topk_group = config.router.n_group, config.router.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.router.routed_scaling_factor

    def _choose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (unbiased scores [T, E], chosen ids [T, K])."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [T, E]
        biased = scores + self.e_score_correction_bias  # [T, E]: for the choice only
        group_score = biased.view(x.shape[0], self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        biased = biased.masked_fill(~_group_mask(group_score, self.topk_group, scores.shape[-1]), float("-inf"))
        return scores, torch.topk(biased, self.top_k, dim=-1, sorted=False).indices  # [T, K]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, ids = self._choose(x)
        weights = scores.gather(1, ids)  # [T, K]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids

    def select(self, x: torch.Tensor) -> torch.Tensor:
        return self._choose(x)[1]


class BiasedTopKSoftmaxRouter(nn.Module):
    """gpt_oss: logits from a linear layer with a bias, their top-k, then a softmax over those k
    (transformers' GptOssTopKRouter, whose softmax runs in the logits' dtype)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(config.num_experts), requires_grad=False)
        self.top_k = config.top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, ids = torch.topk(F.linear(x, self.weight, self.bias), self.top_k, dim=-1)  # [T, K]
        return F.softmax(top, dim=-1, dtype=top.dtype), ids

    def select(self, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(F.linear(x, self.weight, self.bias), self.top_k, dim=-1).indices  # [T, K]


def _group_mask(group_score: torch.Tensor, topk_group: int, num_experts: int) -> torch.Tensor:
    """group_score [T, G] → bool [T, E]: True for the experts of each token's topk_group best groups."""
    best = torch.topk(group_score, k=topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
    return keep.repeat_interleave(num_experts // group_score.shape[-1], dim=-1)  # [T, E]


ROUTERS: dict[str, type[nn.Module]] = {
    "softmax": SoftmaxRouter,
    "softmax_greedy": DeepseekV2Router,
    "softmax_group_limited": DeepseekV2Router,
    "sigmoid_grouped": SigmoidGroupedRouter,
    "biased_topk_softmax": BiasedTopKSoftmaxRouter,
}


def build_router(config: ModelConfig) -> nn.Module:
    return ROUTERS[config.router.kind](config)
