"""Qwen3-MoE: per-head RMSNorm on q and k, no attention bias, no shared expert; `norm_topk_prob`
true or false. All of it is carried by `ModelConfig`; the checkpoint layout is the default one."""

from moeserve.models.decoder import MoeCausalLM


class Qwen3MoeForCausalLM(MoeCausalLM):
    moe_attr = "mlp"
