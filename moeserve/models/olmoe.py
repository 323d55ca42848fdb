"""OLMoE: RMSNorm over the full q and k projections (not per head), optional `clip_qkv`.
All of it is carried by `ModelConfig`; the checkpoint layout is the default one."""

from moeserve.models.decoder import MoeCausalLM


class OlmoeForCausalLM(MoeCausalLM):
    moe_attr = "mlp"
