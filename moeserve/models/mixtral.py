"""Mixtral: experts under `block_sparse_moe`, named w1 (gate), w3 (up), w2 (down); renormalised top-k."""

from moeserve.models.decoder import MoeCausalLM


class MixtralForCausalLM(MoeCausalLM):
    moe_attr = "block_sparse_moe"

    @classmethod
    def expert_tensor_names(cls, layer: int, expert: int) -> tuple[str, str, str]:
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return f"{prefix}.w1.weight", f"{prefix}.w3.weight", f"{prefix}.w2.weight"
