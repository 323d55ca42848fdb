"""model_type → model class."""

import torch

from moeserve.config import ModelConfig
from moeserve.models.decoder import MoeCausalLM
from moeserve.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from moeserve.models.glm4_moe import Glm4MoeForCausalLM
from moeserve.models.gpt_oss import GptOssForCausalLM
from moeserve.models.mixtral import MixtralForCausalLM
from moeserve.models.olmoe import OlmoeForCausalLM
from moeserve.models.qwen2_moe import Qwen2MoeForCausalLM
from moeserve.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_FAMILIES: dict[str, type[MoeCausalLM]] = {
    "mixtral": MixtralForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "olmoe": OlmoeForCausalLM,
    "deepseek_v2": DeepseekV2ForCausalLM,
    "deepseek_v3": DeepseekV3ForCausalLM,
    "glm4_moe": Glm4MoeForCausalLM,
    "gpt_oss": GptOssForCausalLM,
}


def build_model(config: ModelConfig) -> MoeCausalLM:
    """An empty model on the meta device: no memory is touched until the loader fills it."""
    with torch.device("meta"):
        return MODEL_FAMILIES[config.model_type](config)
