"""GLM-4.5 / 4.6 MoE (glm4_moe): partial rotary, q/k/v biases, optional per-head q/k norm, dense
MLPs before `first_k_dense_replace`, ungated `shared_experts`, and DeepSeek-V3's sigmoid router with
correction bias and groups, all carried by `ModelConfig`. The checkpoint layout is the default one;
like transformers, the router and its correction bias stay float32."""

from moeserve.models.decoder import MoeCausalLM


class Glm4MoeForCausalLM(MoeCausalLM):
    moe_attr = "mlp"
    float32_parameters = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")
