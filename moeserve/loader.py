"""A Hugging Face MoE checkpoint directory → a filled model, its routed experts and its tokenizer.

In:  a local directory (config.json, safetensors shard(s), tokenizer files), a device and dtype.
Out: `LoadedModel`: the resident model (attention, norms, embeddings, routers, dense and shared
     MLPs) on the device; the routed experts stay in the mapped files until `load_dense_experts`
     (all resident) or the offloading runtime (compressed store) takes them.

Tensors are taken one at a time from the memory-mapped files and converted in place of the
model's meta-device parameters, so peak memory is one copy of the weights plus one tensor;
when no conversion is needed (CPU, stored dtype) the parameters stay views of the mapped file,
except those the file does not start on a 64-byte boundary: safetensors aligns tensor data to
8 bytes only, and every weight a matmul reads starts aligned (alignment.py), so those are copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from moeserve import huge_pages
from moeserve.alignment import ensure_aligned
from moeserve.checkpoint import CheckpointTensors
from moeserve.config import ModelConfig, parse_model_config, read_config_json
from moeserve.errors import ModelLoadError
from moeserve.experts import DenseExpertProvider, ExpertWeights, Mxfp4ExpertWeights, StackedExperts, stack_experts
from moeserve.models import build_model
from moeserve.models.decoder import MoeCausalLM
from moeserve.tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedModel:
    model_dir: Path
    config: ModelConfig
    model: MoeCausalLM
    tokenizer: Tokenizer | None
    checkpoint: CheckpointTensors


def resolve_model_dir(model: str | Path | None) -> Path:
    if model is None:
        from moeserve.assets import default_model_dir

        return default_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist; pass a local checkpoint directory.")
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is a file, not a directory; pass the checkpoint's directory.")
    return path


def load_config(model_dir: Path) -> ModelConfig:
    config = parse_model_config(read_config_json(model_dir), source=str(model_dir / "config.json"))
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        if eos is not None:
            eos_ids = (eos,) if isinstance(eos, int) else tuple(eos)
            config = replace(config, eos_token_ids=tuple(dict.fromkeys(eos_ids + config.eos_token_ids)))
    return config


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype | None = None) -> LoadedModel:
    config = load_config(model_dir)
    if dtype is not None:
        config = replace(config, dtype=dtype)
    checkpoint = CheckpointTensors(model_dir)
    model = build_model(config)
    _fill_resident(model, checkpoint, config, device)
    return LoadedModel(
        model_dir=model_dir,
        config=config,
        model=model.eval(),
        tokenizer=load_tokenizer(model_dir),
        checkpoint=checkpoint,
    )


def load_dense_experts(loaded: LoadedModel, device: torch.device) -> DenseExpertProvider:
    """Every routed expert on the device in the compute dtype (no offloading); MXFP4 experts are
    dequantized there, exactly as transformers dequantizes them. Each layer is copied into one stacked
    tensor (the layout of the offload cache's slots), gate and up fused, even a checkpoint a CPU could
    compute from where it is mapped: a stacked layer lets the MoE block route on the device, and lets a
    compiled CPU step compute the layer's experts in two grouped GEMM calls instead of going back to Python
    for each expert (1.3-1.5x the decode tok/s of a bfloat16 qwen3_moe of 8 layers and 32 experts; bench/README.md,
    "Against llama.cpp"). The mapped pages stay in the page cache, which the kernel may reclaim."""
    dtype = loaded.config.dtype
    d, i = loaded.config.hidden_size, loaded.config.moe_intermediate_size
    stacked: dict[int, StackedExperts] = {}
    for layer, weights in iter_stored_experts(loaded.model, loaded.checkpoint, loaded.config, keep_mxfp4=True):
        # a generator: one expert converted at a time, never a second copy of the layer
        converted = (_stackable(w, device) for w in weights)
        stacked[layer] = stack_experts(converted, len(weights), i, d, device, dtype)
    return DenseExpertProvider.from_stacked(stacked)


def _stackable(w: ExpertWeights | Mxfp4ExpertWeights, device: torch.device) -> ExpertWeights:
    """An expert `stack_experts` can copy from (it converts the dtype): MXFP4 dequantized on `device`."""
    if isinstance(w, Mxfp4ExpertWeights):
        return w.dequantize(device)
    for tensor in (w.gate, w.up, w.down):
        _require_float(tensor)
    return w


def iter_stored_experts(
    model: MoeCausalLM, checkpoint: CheckpointTensors, config: ModelConfig, keep_mxfp4: bool = False
) -> Iterator[tuple[int, list[ExpertWeights] | list[Mxfp4ExpertWeights]]]:
    """Per MoE layer, its experts as stored in the checkpoint (stored dtype, CPU, mapped views where
    the layout allows). An MXFP4 checkpoint's experts come as `Mxfp4ExpertWeights` with `keep_mxfp4`,
    else dequantized in the compute dtype."""
    d, i = config.hidden_size, config.moe_intermediate_size
    for layer in config.moe_layer_ids:
        own = model.stored_layer_experts(partial(_checked, checkpoint), layer, config, keep_mxfp4)
        if own is not None:
            yield layer, own
            continue
        gate_up_name, down_name = model.fused_expert_tensor_names(layer)
        if model.expert_tensor_names(layer, 0)[0] not in checkpoint and gate_up_name in checkpoint:
            gate_up = _checked(checkpoint, gate_up_name, (config.num_experts, 2 * i, d))
            down = _checked(checkpoint, down_name, (config.num_experts, d, i))
            yield layer, [ExpertWeights.fused(gate_up[e], down[e]) for e in range(config.num_experts)]
            continue
        weights = []
        for expert in range(config.num_experts):
            gate_name, up_name, down_name = model.expert_tensor_names(layer, expert)
            gate, up = _checked(checkpoint, gate_name, (i, d)), _checked(checkpoint, up_name, (i, d))
            down = _checked(checkpoint, down_name, (d, i))
            # Files that store gate right before up (sorted names: qwen, olmoe) serve both with one matmul.
            gate_up = checkpoint.get_adjacent([gate_name, up_name])
            weights.append(ExpertWeights.fused(gate_up, down) if gate_up is not None else ExpertWeights(gate, up, down))
        yield layer, weights


def _fill_resident(model: MoeCausalLM, checkpoint: CheckpointTensors, config: ModelConfig, device: torch.device):
    converted: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # a tied lm_head shares the embeddings' tensor
    for name, param in list(model.named_parameters()):
        source = name
        if name == "lm_head.weight" and (config.tie_word_embeddings or name not in checkpoint):
            if not config.tie_word_embeddings:
                raise ModelLoadError(
                    f"checkpoint {checkpoint.model_dir} is missing tensor 'lm_head.weight' and config.json "
                    f"does not set tie_word_embeddings; re-export the checkpoint."
                )
            source = "model.embed_tokens.weight"
        tensor = _checked(checkpoint, source, tuple(param.shape))
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        dtype = torch.float32 if model.keeps_float32(name) else config.dtype
        if (source, dtype) not in converted:
            converted[source, dtype] = _convert(tensor, device, dtype)
        setattr(module, attr, nn.Parameter(converted[source, dtype], requires_grad=False))


def _checked(checkpoint: CheckpointTensors, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in checkpoint:
        raise ModelLoadError(
            f"checkpoint {checkpoint.model_dir} is missing tensor {name!r} (expected shape {list(shape)}); "
            f"re-export the checkpoint or check that config.json matches it."
        )
    found = checkpoint.shape(name)
    if found != shape:
        raise ModelLoadError(
            f"tensor {name!r} has shape {list(found)} but config.json implies {list(shape)}; "
            f"the checkpoint and its config.json do not match."
        )
    return checkpoint.get(name)


def _require_float(tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ModelLoadError(f"a weight tensor has integer dtype {tensor.dtype}; quantized checkpoints are not supported.")


def _convert(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    _require_float(tensor)
    if torch.device(device).type == "cpu" and tensor.numel() * dtype.itemsize >= huge_pages.MIN_BYTES:
        # read every step: a copy on huge pages rather than the mapped file's 4 KiB pages (huge_pages.py)
        return huge_pages.weight_buffer(tuple(tensor.shape), dtype, device).copy_(tensor)
    return ensure_aligned(tensor.to(device=device, dtype=dtype))
