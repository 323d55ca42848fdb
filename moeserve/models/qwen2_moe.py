"""Qwen2-MoE: q/k/v biases, a shared expert behind a sigmoid gate, optional dense layers
(`decoder_sparse_step`, `mlp_only_layers`), top-k renormalised only with `norm_topk_prob`.
All of it is carried by `ModelConfig`; the checkpoint layout is the default one."""

from moeserve.models.decoder import MoeCausalLM


class Qwen2MoeForCausalLM(MoeCausalLM):
    moe_attr = "mlp"
