"""DeepSeek-V2 / V3 (also Moonlight and Kimi-K2, which ship as deepseek_v3): multi-head latent
attention (layers/mla.py), dense MLPs before `first_k_dense_replace`, ungated `shared_experts`, and
their routers (layers/routing.py), all carried by `ModelConfig`. The checkpoint layout is the
default one; like transformers, the router and its correction bias stay float32."""

from moeserve.models.decoder import MoeCausalLM


class DeepseekV2ForCausalLM(MoeCausalLM):
    moe_attr = "mlp"
    float32_parameters = (".mlp.gate.weight",)


class DeepseekV3ForCausalLM(MoeCausalLM):
    moe_attr = "mlp"
    float32_parameters = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")
