"""The parts of config.json that only some families have: rope scaling, multi-head latent
attention (DeepSeek-V2/V3), and the DeepSeek / GLM / gpt_oss routers.

In:  the raw config.json dict of one checkpoint (already known to be a supported model_type).
Out: `RopeConfig`, `MlaConfig` and `RouterConfig`, the dataclasses `ModelConfig` holds.

Defaults follow transformers 5.x, the reference every family is checked against: a key missing
from config.json means what transformers' config class would make of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from moeserve.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
DEEPSEEK_TYPES = ("deepseek_v2", "deepseek_v3")
DEEPSEEK_V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rotary_dim: int  # leading dims of a head that rotate (qk_rope_head_dim for MLA, a fraction for glm4_moe)
    # "half": rotate_half over the first rotary_dim dims; "interleaved": pairs (x0, x1), (x2, x3) in, the
    # rotated evens then odds out (deepseek_v3's rope_interleave); "complex": pairs in and out, computed
    # in float32 as complex products (deepseek_v2).
    layout: str = "half"
    kind: str = "default"  # "default", "linear" or "yarn"
    factor: float = 1.0
    # YaRN only (transformers' _compute_yarn_parameters):
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0  # cos/sin are multiplied by it
    truncate: bool = True


@dataclass(frozen=True)
class MlaConfig:
    """Multi-head latent attention: K and V of every head come from one cached latent per token."""

    q_lora_rank: int | None  # None: q straight from the hidden state (q_proj)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float  # qk_head_dim ** -0.5, times YaRN's mscale(factor, mscale_all_dim) ** 2

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token and layer: the normalised kv latent, then the shared rotated key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class RouterConfig:
    """How a MoE layer picks and weights its experts; each kind is one class in layers/routing.py."""

    # "softmax": softmax in float32 over the router's logits, top-k (mixtral, qwen, olmoe);
    # "softmax_greedy" / "softmax_group_limited": deepseek_v2's float32 router, top-k over all experts or
    # over the topk_group groups with the highest max score, then times routed_scaling_factor;
    # "sigmoid_grouped": deepseek_v3 / glm4_moe, sigmoid scores, e_score_correction_bias added for the
    # choice only, groups ranked by their top-2 sum, then renormalised and times routed_scaling_factor.
    # "biased_topk_softmax": gpt_oss, a linear layer with a bias, top-k of its logits, softmax over those k.
    kind: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0


def parse_rope(raw: dict[str, Any], source: str, rotary_dim: int, layout: str = "half") -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older checkpoints use `rope_theta` + `rope_scaling`.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    if kind == "default":
        return RopeConfig(theta=theta, rotary_dim=rotary_dim, layout=layout)
    if kind == "linear":
        return RopeConfig(theta, rotary_dim, layout, kind, factor=float(params.get("factor", 1.0)))
    # A top-level original_max_position_embeddings wins over the one in the rope dict, as in transformers.
    original = int(
        raw.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or raw.get("max_position_embeddings", 4096)
    )
    factor = params.get("factor")
    factor = float(factor) if factor is not None else raw.get("max_position_embeddings", original) / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return RopeConfig(
        theta,
        rotary_dim,
        layout,
        kind,
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        attention_factor=float(attention_factor),
        truncate=bool(params.get("truncate", True)),
    )


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def partial_rotary_dim(raw: dict[str, Any], head_dim: int) -> int:
    """glm4_moe rotates a fraction of each head (transformers defaults it to one half)."""
    params = raw.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))
    return int(head_dim * float(factor))


def parse_mla(raw: dict[str, Any], source: str, need, rope: RopeConfig) -> MlaConfig:
    q_lora_rank = raw.get("q_lora_rank")
    mla = MlaConfig(
        q_lora_rank=int(q_lora_rank) if q_lora_rank else None,
        kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")),
        qk_rope_head_dim=int(need("qk_rope_head_dim")),
        v_head_dim=int(need("v_head_dim")),
        softmax_scale=0.0,
    )
    if mla.qk_rope_head_dim % 2:
        raise ModelLoadError(f"{source}: qk_rope_head_dim={mla.qk_rope_head_dim} must be even for rotary embedding.")
    scale = mla.qk_head_dim**-0.5
    mscale_all_dim = (raw.get("rope_parameters") or raw.get("rope_scaling") or {}).get("mscale_all_dim")
    # transformers' yarn_apply_mscale: any non-default rope type with mscale_all_dim sharpens the softmax.
    if rope.kind != "default" and mscale_all_dim:
        scale *= yarn_mscale(rope.factor, float(mscale_all_dim)) ** 2
    return replace(mla, softmax_scale=scale)


def parse_router(raw: dict[str, Any], source: str, model_type: str, num_experts: int, top_k: int) -> RouterConfig:
    scaling = float(raw.get("routed_scaling_factor") or 1.0)
    if model_type == "deepseek_v2":
        method = raw.get("topk_method") or "greedy"
        if method not in DEEPSEEK_V2_TOPK_METHODS:
            raise ModelLoadError(
                f"{source}: topk_method {method!r} is not supported for deepseek_v2; "
                f"supported: {', '.join(DEEPSEEK_V2_TOPK_METHODS)}."
            )
        if method == "greedy":
            return RouterConfig("softmax_greedy", routed_scaling_factor=scaling)
        return _grouped(raw, source, "softmax_group_limited", num_experts, top_k, scaling)
    return _grouped(raw, source, "sigmoid_grouped", num_experts, top_k, scaling)


def _grouped(raw: dict[str, Any], source: str, kind: str, num_experts: int, top_k: int, scaling: float) -> RouterConfig:
    n_group, topk_group = int(raw.get("n_group") or 1), int(raw.get("topk_group") or 1)
    if num_experts % n_group or not 0 < topk_group <= n_group:
        raise ModelLoadError(
            f"{source}: n_group={n_group} must divide the {num_experts} routed experts and topk_group={topk_group} "
            f"must be between 1 and n_group."
        )
    per_group = num_experts // n_group
    if kind == "sigmoid_grouped" and per_group < 2:
        raise ModelLoadError(f"{source}: groups are ranked by their two best experts, so n_group={n_group} "
                             f"must leave at least 2 of the {num_experts} experts per group.")
    if top_k > topk_group * per_group:
        raise ModelLoadError(
            f"{source}: num_experts_per_tok={top_k} is more than the {topk_group * per_group} experts of the "
            f"topk_group={topk_group} groups a token may use; raise topk_group or lower num_experts_per_tok."
        )
    return RouterConfig(kind, n_group, topk_group, scaling)
