"""config.json → `ModelConfig`: one normalised description of every supported MoE family.

The families spell the same idea differently (`num_local_experts` vs `num_experts`,
`rope_theta` vs `rope_parameters`, per-head vs full-width q/k norms, dense layers by
`decoder_sparse_step` / `mlp_only_layers`, gpt_oss's `layer_types`, sinks and MXFP4 experts).
Everything downstream (models, loader, offloading) reads only this dataclass, so family quirks
live here and in `models/`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeserve.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class YarnRope:
    """YaRN rope scaling (transformers' `_compute_yarn_parameters`): blended inverse frequencies and
    an `attention_factor` that scales cos and sin."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    truncate: bool
    attention_factor: float


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    rope_theta: float
    rope_linear_factor: float  # positions are divided by this ("linear" rope scaling); 1.0 = none
    attention_bias: bool
    qk_norm: str  # "none", "per_head" (qwen3_moe: over head_dim) or "full" (olmoe: over the projection)
    clip_qkv: float | None
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    # Mixtral multiplies expert outputs by float32 routing weights; the Qwen/OLMoE families cast
    # the weights to the activation dtype first. Matters only for bf16/fp16 parity.
    routing_weights_in_float32: bool
    moe_layers: tuple[bool, ...]  # per layer: True = sparse MoE block, False = dense MLP
    dense_intermediate_size: int
    shared_expert_intermediate_size: int  # 0 = no shared expert
    tie_word_embeddings: bool
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None
    rope_yarn: YarnRope | None = None  # set for rope type "yarn" (gpt_oss's default)
    attention_output_bias: bool = False  # o_proj has a bias (gpt_oss)
    attention_sinks: bool = False  # a learned per-head logit joins every softmax, then is dropped (gpt_oss)
    # RMSNorm multiplies by its weight in float32 and then casts (gpt_oss); otherwise it casts first.
    norm_scale_in_float32: bool = False
    router_bias: bool = False  # the router is a linear layer with a bias (gpt_oss)
    swiglu_alpha: float = 1.702  # gpt_oss's clamped SwiGLU: gate * sigmoid(alpha * gate) * (up + 1)
    swiglu_limit: float = 7.0  # gate clamped above, up on both sides, at this value
    expert_quantization: str | None = None  # "mxfp4": the checkpoint stores routed experts as MXFP4

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, sparse in enumerate(self.moe_layers) if sparse]


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{model_dir} has no config.json; point --model at a Hugging Face checkpoint directory."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix or re-export it.") from None


def parse_model_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Normalise a Hugging Face config dict. `source` names the file in error messages."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: model_type {model_type!r} is not supported; supported types are "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )

    def need(key: str, *aliases: str) -> Any:
        for name in (key, *aliases):
            if raw.get(name) is not None:
                return raw[name]
        raise ModelLoadError(f"{source}: required key {key!r} is missing for model_type {model_type!r}.")

    hidden_size = int(need("hidden_size"))
    num_layers = int(need("num_hidden_layers"))
    num_heads = int(need("num_attention_heads"))
    num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
    head_dim = int(raw.get("head_dim") or hidden_size // num_heads)
    if num_heads % num_kv_heads:
        raise ModelLoadError(
            f"{source}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}."
        )

    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ModelLoadError(
            f"{source}: hidden_act {hidden_act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}."
        )

    max_positions = int(raw.get("max_position_embeddings", 4096))
    rope_theta, rope_linear_factor, rope_yarn = _parse_rope(raw, source, max_positions)
    expert_quantization = _expert_quantization(raw, model_type, source)
    gpt_oss = model_type == "gpt_oss"
    experts_key = "num_local_experts" if model_type in ("mixtral", "gpt_oss") else "num_experts"
    num_experts = int(need(experts_key, "num_local_experts"))
    top_k = int(need("num_experts_per_tok"))
    if not 0 < top_k <= num_experts:
        raise ModelLoadError(f"{source}: num_experts_per_tok={top_k} must be between 1 and the {num_experts} experts.")

    if model_type in ("mixtral", "gpt_oss"):
        moe_intermediate = int(need("intermediate_size"))
    else:
        moe_intermediate = int(need("moe_intermediate_size", "intermediate_size"))

    return ModelConfig(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        hidden_act=hidden_act,
        max_position_embeddings=max_positions,
        rope_theta=rope_theta,
        rope_linear_factor=rope_linear_factor,
        attention_bias=_attention_bias(raw, model_type),
        qk_norm={"qwen3_moe": "per_head", "olmoe": "full"}.get(model_type, "none"),
        clip_qkv=float(raw["clip_qkv"]) if raw.get("clip_qkv") is not None else None,
        sliding_windows=_sliding_windows(raw, model_type, num_layers),
        num_experts=num_experts,
        top_k=top_k,
        moe_intermediate_size=moe_intermediate,
        norm_topk_prob=True if model_type in ("mixtral", "gpt_oss") else bool(raw.get("norm_topk_prob", False)),
        routing_weights_in_float32=model_type == "mixtral",
        moe_layers=_moe_layers(raw, model_type, num_layers, num_experts),
        dense_intermediate_size=0 if gpt_oss else int(raw.get("intermediate_size") or 0),
        shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
        if model_type == "qwen2_moe"
        else 0,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        dtype=_parse_dtype(raw, source),
        eos_token_ids=_token_ids(raw.get("eos_token_id")),
        bos_token_id=raw.get("bos_token_id"),
        rope_yarn=rope_yarn,
        attention_output_bias=gpt_oss and _attention_bias(raw, model_type),
        attention_sinks=gpt_oss,
        norm_scale_in_float32=gpt_oss,
        router_bias=gpt_oss,
        swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        expert_quantization=expert_quantization,
    )


def _parse_rope(raw: dict[str, Any], source: str, max_positions: int) -> tuple[float, float, YarnRope | None]:
    # transformers >= 5 writes `rope_parameters`; older checkpoints use `rope_theta` + `rope_scaling`.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
        )
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return theta, factor, _parse_yarn(params, source, max_positions) if rope_type == "yarn" else None


def _parse_yarn(params: dict[str, Any], source: str, max_positions: int) -> YarnRope:
    original = params.get("original_max_position_embeddings")
    if original is None:
        raise ModelLoadError(
            f"{source}: yarn rope scaling needs original_max_position_embeddings; add it to rope_parameters."
        )
    factor = float(params["factor"]) if params.get("factor") is not None else max_positions / int(original)

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        weight, weight_all = params.get("mscale"), params.get("mscale_all_dim")
        both = weight and weight_all
        attention_factor = mscale(factor, weight) / mscale(factor, weight_all) if both else mscale(factor)
    return YarnRope(
        factor=factor,
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention_factor),
    )


def _expert_quantization(raw: dict[str, Any], model_type: str, source: str) -> str | None:
    quantization = raw.get("quantization_config")
    if not quantization:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method == "mxfp4" and model_type == "gpt_oss":
        return "mxfp4"
    raise ModelLoadError(
        f"{source}: quantization method {method!r} is not supported for model_type {model_type!r} (moeserve reads "
        f"MXFP4 gpt_oss experts only); use an unquantized bf16, fp16 or fp32 export of the model."
    )


def _attention_bias(raw: dict[str, Any], model_type: str) -> bool:
    if model_type == "qwen2_moe":
        # Qwen2-MoE always had q/k/v biases; transformers 5 made it the `qkv_bias` key.
        return bool(raw.get("qkv_bias", True))
    if model_type == "mixtral":
        return False
    return bool(raw.get("attention_bias", model_type == "gpt_oss"))


def _sliding_windows(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window", 128 if model_type == "gpt_oss" else None)
    if model_type in ("qwen2_moe", "qwen3_moe") and not raw.get("use_sliding_window", False):
        window = None
    if not window:
        return (None,) * num_layers
    layer_types = raw.get("layer_types")
    if layer_types is None and model_type == "gpt_oss":
        # transformers' GptOssConfig default: sliding windows on even layers, full attention on odd ones.
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if layer_types is None and model_type == "qwen2_moe":
        max_window_layers = int(raw.get("max_window_layers", num_layers))
        layer_types = [
            "sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full_attention"
            for i in range(num_layers)
        ]
    if layer_types is None:
        return (int(window),) * num_layers
    return tuple(int(window) if kind == "sliding_attention" else None for kind in layer_types)


def _moe_layers(raw: dict[str, Any], model_type: str, num_layers: int, num_experts: int) -> tuple[bool, ...]:
    if model_type not in ("qwen2_moe", "qwen3_moe"):
        return (True,) * num_layers
    step = int(raw.get("decoder_sparse_step", 1) or 1)
    dense = set(raw.get("mlp_only_layers") or [])
    return tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))


def _parse_dtype(raw: dict[str, Any], source: str) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ModelLoadError(f"{source}: dtype {name!r} is not supported; supported: {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def parse_dtype_option(name: str | torch.dtype | None) -> torch.dtype | None:
    """The user's `dtype=` option: None keeps the checkpoint's dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise ModelLoadError(f"dtype {name!r} is not supported; use one of {', '.join(_DTYPES)}.")
    return _DTYPES[key]


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
