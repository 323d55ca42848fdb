"""config.json → `ModelConfig`: one normalised description of every supported MoE family.

The families spell the same idea differently (`num_local_experts` vs `num_experts` vs
`n_routed_experts`, `rope_theta` vs `rope_parameters`, per-head vs full-width q/k norms, dense
layers by `decoder_sparse_step` / `mlp_only_layers` / `first_k_dense_replace`, gpt_oss's
`layer_types`, sinks and MXFP4 experts). Everything downstream (models, loader, offloading) reads
only this dataclass, so family quirks live here, in config_families.py (rope scaling, latent
attention, routers) and in `models/`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeserve.config_families import (
    DEEPSEEK_TYPES,
    MlaConfig,
    RopeConfig,
    RouterConfig,
    parse_mla,
    parse_rope,
    parse_router,
    partial_rotary_dim,
)
from moeserve.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss",
)  # fmt: skip
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
# Families whose routers and shared experts follow DeepSeek's MoE (n_routed_experts, shared_experts).
DEEPSEEK_MOE_TYPES = (*DEEPSEEK_TYPES, "glm4_moe")

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    rope: RopeConfig
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
    router: RouterConfig = RouterConfig()
    # True: qwen2_moe's `shared_expert` behind a sigmoid `shared_expert_gate`; False: DeepSeek's ungated
    # `shared_experts`.
    shared_expert_gated: bool = True
    mlp_bias: bool = False  # dense MLPs and shared experts have biases (deepseek_v2's mlp_bias)
    mla: MlaConfig | None = None  # set: multi-head latent attention (deepseek_v2 / deepseek_v3)
    attention_output_bias: bool = False  # o_proj has a bias (gpt_oss)
    attention_sinks: bool = False  # a learned per-head logit joins every softmax, then is dropped (gpt_oss)
    # RMSNorm multiplies by its weight in float32 and then casts (gpt_oss); otherwise it casts first.
    norm_scale_in_float32: bool = False
    swiglu_alpha: float = 1.702  # gpt_oss's clamped SwiGLU: gate * sigmoid(alpha * gate) * (up + 1)
    swiglu_limit: float = 7.0  # gate clamped above, up on both sides, at this value
    expert_quantization: str | None = None  # "mxfp4": the checkpoint stores routed experts as MXFP4

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, sparse in enumerate(self.moe_layers) if sparse]

    @property
    def kv_cache_layout(self) -> tuple[int, int, bool]:
        """(heads, values per head, separate V) of one token's KV-cache entry in one layer. MLA caches
        its latent as a single "head" that serves as both keys (all of it) and values (its first
        kv_lora_rank values)."""
        if self.mla is not None:
            return 1, self.mla.latent_dim, False
        return self.num_kv_heads, self.head_dim, True

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes over all layers, as this model caches it."""
        heads, dim, separate_values = self.kv_cache_layout
        return self.num_layers * heads * dim * (2 if separate_values else 1) * self.dtype.itemsize

    @property
    def full_kv_bytes_per_token(self) -> int:
        """What expanded per-head K and V would take per token (the same as `kv_bytes_per_token`
        except for MLA, whose per-head K and V are recomputed from the cached latent)."""
        if self.mla is None:
            return self.kv_bytes_per_token
        per_layer = self.num_heads * (self.mla.qk_head_dim + self.mla.v_head_dim)
        return self.num_layers * per_layer * self.dtype.itemsize

    def describe_kv_cache(self) -> str:
        """The line `moeserve policy show` prints under its table: what each token of context costs."""
        line = f"KV cache: {self.kv_bytes_per_token} bytes/token"
        if self.mla is not None:
            line += f" (MLA latent; expanded per-head K/V would need {self.full_kv_bytes_per_token})"
        return line


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
    if model_type == "deepseek_v32":
        raise ModelLoadError(
            f"{source}: model_type 'deepseek_v32' (DeepSeek-V3.2's sparse attention) is not supported; "
            f"supported types are {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
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

    expert_quantization = _expert_quantization(raw, model_type, source)
    hidden_size = int(need("hidden_size"))
    num_layers = int(need("num_hidden_layers"))
    num_heads = int(need("num_attention_heads"))
    num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
    head_dim = int(raw.get("head_dim") or hidden_size // num_heads)
    mla_family = model_type in DEEPSEEK_TYPES
    if mla_family:
        num_kv_heads = num_heads  # MLA gives every head its own K and V (from one shared latent)
    if num_heads % num_kv_heads:
        raise ModelLoadError(
            f"{source}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}."
        )

    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ModelLoadError(
            f"{source}: hidden_act {hidden_act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}."
        )

    if mla_family:
        interleaved = raw.get("rope_interleave", True)
        layout = "complex" if model_type == "deepseek_v2" else ("interleaved" if interleaved else "half")
        rope = parse_rope(raw, source, int(need("qk_rope_head_dim")), layout)
        mla = parse_mla(raw, source, need, rope)
        head_dim = mla.qk_head_dim
    else:
        rotary_dim = partial_rotary_dim(raw, head_dim) if model_type == "glm4_moe" else head_dim
        rope, mla = parse_rope(raw, source, rotary_dim), None

    gpt_oss = model_type == "gpt_oss"
    deepseek_moe = model_type in DEEPSEEK_MOE_TYPES
    if model_type in ("mixtral", "gpt_oss"):
        num_experts = int(need("num_local_experts"))
    elif deepseek_moe:
        num_experts = int(need("n_routed_experts", "num_local_experts"))
    else:
        num_experts = int(need("num_experts", "num_local_experts"))
    top_k = int(need("num_experts_per_tok"))
    if not 0 < top_k <= num_experts:
        raise ModelLoadError(f"{source}: num_experts_per_tok={top_k} must be between 1 and the {num_experts} experts.")

    if model_type in ("mixtral", "gpt_oss"):
        moe_intermediate = int(need("intermediate_size"))
    else:
        moe_intermediate = int(need("moe_intermediate_size", "intermediate_size"))
    if model_type == "qwen2_moe":
        shared_intermediate = int(raw.get("shared_expert_intermediate_size") or 0)
    elif deepseek_moe:
        shared_intermediate = moe_intermediate * int(raw.get("n_shared_experts") or 0)
    else:
        shared_intermediate = 0
    if deepseek_moe and raw.get("num_nextn_predict_layers"):
        log.warning(
            "%s: ignoring %s multi-token-prediction layer(s) (num_nextn_predict_layers); moeserve decodes "
            "one token per step.", source, raw["num_nextn_predict_layers"]
        )

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
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        rope=rope,
        attention_bias=_attention_bias(raw, model_type),
        qk_norm=_qk_norm(raw, model_type),
        clip_qkv=float(raw["clip_qkv"]) if raw.get("clip_qkv") is not None else None,
        sliding_windows=_sliding_windows(raw, model_type, num_layers),
        num_experts=num_experts,
        top_k=top_k,
        moe_intermediate_size=moe_intermediate,
        norm_topk_prob=_norm_topk_prob(raw, model_type),
        # transformers' DeepSeek / GLM experts, like Mixtral's, multiply by float32 routing weights.
        routing_weights_in_float32=model_type == "mixtral" or deepseek_moe,
        moe_layers=_moe_layers(raw, model_type, num_layers, num_experts),
        dense_intermediate_size=0 if gpt_oss else int(raw.get("intermediate_size") or 0),
        shared_expert_intermediate_size=shared_intermediate,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        dtype=_parse_dtype(raw, source),
        eos_token_ids=_token_ids(raw.get("eos_token_id")),
        bos_token_id=raw.get("bos_token_id"),
        router=_router(raw, source, model_type, num_experts, top_k),
        shared_expert_gated=not deepseek_moe,
        mlp_bias=model_type == "deepseek_v2" and bool(raw.get("mlp_bias", False)),
        mla=mla,
        attention_output_bias=gpt_oss and _attention_bias(raw, model_type),
        attention_sinks=gpt_oss,
        norm_scale_in_float32=gpt_oss,
        swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        expert_quantization=expert_quantization,
    )


def _router(raw: dict[str, Any], source: str, model_type: str, num_experts: int, top_k: int) -> RouterConfig:
    if model_type in DEEPSEEK_MOE_TYPES:
        return parse_router(raw, source, model_type, num_experts, top_k)
    return RouterConfig("biased_topk_softmax" if model_type == "gpt_oss" else "softmax")


def _expert_quantization(raw: dict[str, Any], model_type: str, source: str) -> str | None:
    quantization = raw.get("quantization_config")
    if not quantization:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method == "mxfp4" and model_type == "gpt_oss":
        return "mxfp4"
    raise ModelLoadError(
        f"{source}: quantization method {method!r} is not supported for model_type {model_type!r} "
        f"(quant_method {method!r}; moeserve reads MXFP4 gpt_oss experts only); "
        f"use an unquantized bf16, fp16 or fp32 export of the model."
    )


def _qk_norm(raw: dict[str, Any], model_type: str) -> str:
    if model_type == "glm4_moe":
        return "per_head" if raw.get("use_qk_norm", False) else "none"
    return {"qwen3_moe": "per_head", "olmoe": "full"}.get(model_type, "none")


def _norm_topk_prob(raw: dict[str, Any], model_type: str) -> bool:
    if model_type in ("mixtral", "gpt_oss"):
        return True
    if model_type == "deepseek_v2":
        return False  # transformers' DeepseekV2 router never renormalises its top-k weights
    return bool(raw.get("norm_topk_prob", model_type in ("deepseek_v3", "glm4_moe")))


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
    if model_type in DEEPSEEK_MOE_TYPES:
        first_sparse = int(raw.get("first_k_dense_replace") or 0)  # the first k layers have a dense MLP
        return tuple(i >= first_sparse for i in range(num_layers))
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
