"""Workloads of bench/throughput.py: a model of the engine's own classes plus a way to walk its experts.

In:  a preset name (the shapes of a real MoE, with random weights) or a Hugging Face checkpoint directory.
Out: a `Workload`: the resident model on the compute device (attention, norms, embeddings, routers) and
     `experts()`, a fresh pass over every routed expert, one at a time, that each configuration of the
     benchmark consumes (all resident, bf16 host copies, or the compressed store).

Synthetic experts are never held all at once and never written to disk: each (layer, expert) is drawn
from its own seeded generator on the compute device when it is asked for, so every pass yields the
same weights and a 90 GB model costs one expert of memory to walk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from moeserve.config import ModelConfig, parse_model_config
from moeserve.experts import ExpertWeights
from moeserve.models import build_model
from moeserve.models.decoder import MoeCausalLM

# Legend: D = hidden size, I = expert width (intermediate size).

# config.json fields of the real models; the layer count is the benchmark's to choose.
PRESETS: dict[str, dict] = {
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-5, dtype="bfloat16",
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1e6, max_position_embeddings=40960,
        rms_norm_eps=1e-6, dtype="bfloat16",
    ),
    # A CPU-sized model with Mixtral's proportions (8 experts, top-2) for machines without a GPU.
    "tiny": dict(
        model_type="mixtral", vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2,
        rope_theta=1e6, max_position_embeddings=4096, rms_norm_eps=1e-5, dtype="bfloat16",
    ),
}

WEIGHT_SCALE = 0.02  # per-tensor standard deviation of real LLM weights (initializer_range of these families)
# Student-t with 5 degrees of freedom: kurtosis 9 against a Gaussian's 3, the heavy tails of trained
# weights (a few large values that set the range) without an infinite variance.
TAIL_DOF = 5


@dataclass
class Workload:
    name: str
    config: ModelConfig
    model: MoeCausalLM
    experts: Callable[[], Iterator[tuple[int, Iterable[ExpertWeights]]]]  # per MoE layer, its experts lazily
    source: str  # "synthetic" or the checkpoint directory

    @property
    def expert_nbytes(self) -> int:
        """One decoded expert (gate, up, down) in the compute dtype."""
        c = self.config
        return 3 * c.hidden_size * c.moe_intermediate_size * c.dtype.itemsize

    @property
    def num_experts_total(self) -> int:
        return len(self.config.moe_layer_ids) * self.config.num_experts


def preset_config(name: str, layers: int | None) -> ModelConfig:
    fields = dict(PRESETS[name])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return parse_model_config(fields, source=f"preset {name}")


def synthetic_workload(name: str, layers: int | None, device: torch.device, seed: int) -> Workload:
    config = preset_config(name, layers)
    model = random_resident_model(config, device, seed)

    def experts() -> Iterator[tuple[int, Iterable[ExpertWeights]]]:
        for layer in config.moe_layer_ids:
            yield layer, (synthetic_expert(config, layer, e, device, seed) for e in range(config.num_experts))

    return Workload(name, config, model, experts, "synthetic")


def checkpoint_workload(model_dir: Path, device: torch.device, dtype: torch.dtype | None) -> Workload:
    from moeserve.loader import iter_stored_experts, load_model

    loaded = load_model(model_dir, device, dtype)
    config = loaded.config

    def experts() -> Iterator[tuple[int, Iterable[ExpertWeights]]]:
        # As stored (memory-mapped, the checkpoint's dtype), exactly what the offloading runtime encodes.
        return iter_stored_experts(loaded.model, loaded.checkpoint, config)

    return Workload(model_dir.name, config, loaded.model, experts, str(model_dir))


def random_resident_model(config: ModelConfig, device: torch.device, seed: int) -> MoeCausalLM:
    """The family's model with every resident parameter drawn at WEIGHT_SCALE (norms at 1), in the compute
    dtype on `device`; built from the meta device one parameter at a time, so nothing is held twice."""
    model = build_model(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, meta in list(model.named_parameters()):
            value = torch.empty(meta.shape, dtype=config.dtype, device=device)
            if name.endswith("norm.weight"):
                value.fill_(1.0)
            else:
                value.normal_(0.0, WEIGHT_SCALE, generator=generator)
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=False))
    return model.eval()


def synthetic_expert(config: ModelConfig, layer: int, expert: int, device: torch.device, seed: int) -> ExpertWeights:
    """Expert (layer, expert): the same values on every call with the same seed and device."""
    d, i = config.hidden_size, config.moe_intermediate_size
    # A distinct stream per expert, so any pass (or any subset) regenerates identical weights.
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + layer * 4099 + expert)
    gate = heavy_tailed((i, d), config.dtype, device, generator)  # [I, D]
    up = heavy_tailed((i, d), config.dtype, device, generator)  # [I, D]
    down = heavy_tailed((d, i), config.dtype, device, generator)  # [D, I]
    return ExpertWeights(gate=gate, up=up, down=down)


def heavy_tailed(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, generator) -> torch.Tensor:
    """Student-t values scaled to a per-tensor standard deviation of about WEIGHT_SCALE.

    t = z / sqrt(chi2 / dof), with chi2 a sum of dof squared normals (torch's gamma sampler takes no
    generator); float32 work buffers, the result in `dtype`."""
    z = torch.randn(shape, device=device, generator=generator)
    chi2 = torch.zeros(shape, device=device)
    for _ in range(TAIL_DOF):
        chi2.add_(torch.randn(shape, device=device, generator=generator).square_())
    # Real tensors differ in scale by a few tens of percent; a t variable's own std is sqrt(dof / (dof - 2)).
    jitter = float(torch.exp(0.2 * torch.randn((), device=device, generator=generator)))
    std = WEIGHT_SCALE * jitter / (TAIL_DOF / (TAIL_DOF - 2)) ** 0.5
    return (z.mul_(chi2.div_(TAIL_DOF).rsqrt_()).mul_(std)).to(dtype)
