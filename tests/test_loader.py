"""The loader maps safetensors files instead of copying them, and reads every layout."""

from __future__ import annotations

import ctypes
import json

import torch

from moeserve import LLM
from moeserve.checkpoint import CheckpointTensors
from moeserve.config import parse_model_config


def _mapped_ranges(checkpoint: CheckpointTensors) -> list[tuple[int, int]]:
    ranges = []
    for mapping in checkpoint._maps.values():
        start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        ranges.append((start, start + len(mapping)))
    return ranges


def test_same_dtype_cpu_load_keeps_aligned_weights_in_the_mapped_file(checkpoint_factory):
    # safetensors aligns tensor data to 8 bytes only. A weight the file starts on a 64-byte boundary stays
    # a view of the mapped file; any other is copied once, to memory that starts aligned (alignment.py).
    from moeserve.alignment import is_aligned
    from moeserve.loader import iter_stored_experts, load_dense_experts, load_model

    # in bf16 this checkpoint's file starts some tensors on a 64-byte boundary and some not (asserted below)
    directory, _ = checkpoint_factory("qwen3_moe", dtype=torch.bfloat16)
    loaded = load_model(directory, torch.device("cpu"))
    experts = load_dense_experts(loaded, torch.device("cpu"))
    checkpoint = loaded.checkpoint
    pairs = [(p, checkpoint.get(name)) for name, p in loaded.model.named_parameters()]  # (loaded, as stored)
    stored_experts = iter_stored_experts(loaded.model, checkpoint, loaded.config)
    for layer, stored in stored_experts:
        for loaded_w, stored_w in zip(experts._experts[layer], stored):
            pairs += [(loaded_w.gate_up, stored_w.gate_up), (loaded_w.down, stored_w.down)]
    assert {is_aligned(stored) for _, stored in pairs} == {True, False}, "the checkpoint exercises both cases"
    for tensor, stored in pairs:
        assert is_aligned(tensor)
        assert (tensor.data_ptr() == stored.data_ptr()) == is_aligned(stored), "mapped exactly where aligned"
        assert torch.equal(tensor, stored)


def test_gate_and_up_stored_back_to_back_are_served_as_one_mapped_matrix(checkpoint_factory):
    # qwen3_moe files store experts.N.gate_proj right before experts.N.up_proj (sorted names).
    from moeserve.loader import load_dense_experts, load_model

    from safetensors.torch import load_file

    directory, _ = checkpoint_factory("qwen3_moe")
    loaded = load_model(directory, torch.device("cpu"))
    w = load_dense_experts(loaded, torch.device("cpu")).expert(0, 1)
    assert w.gate_up is not None and w.gate_up.shape == (2 * w.gate.shape[0], w.gate.shape[1])
    assert w.gate_up.data_ptr() == w.gate.data_ptr() and w.gate_up[w.gate.shape[0]:].data_ptr() == w.up.data_ptr()
    reference = load_file(directory / "model.safetensors")
    assert torch.equal(w.gate, reference["model.layers.0.mlp.experts.1.gate_proj.weight"])
    assert torch.equal(w.up, reference["model.layers.0.mlp.experts.1.up_proj.weight"])


def test_experts_not_back_to_back_stay_mapped_unless_converted(checkpoint_factory):
    # mixtral's w1 (gate), w2 (down), w3 (up): gate and up are apart, so a same-dtype load keeps the
    # three mapped tensors; a converting load copies anyway and fuses gate and up on the way.
    from moeserve.loader import load_dense_experts, load_model

    directory, _ = checkpoint_factory("mixtral")
    mapped = load_dense_experts(load_model(directory, torch.device("cpu")), torch.device("cpu")).expert(0, 0)
    assert mapped.gate_up is None
    converted = load_dense_experts(
        load_model(directory, torch.device("cpu"), torch.bfloat16), torch.device("cpu")
    ).expert(0, 0)
    assert converted.gate_up is not None and converted.gate_up.dtype == torch.bfloat16
    assert torch.equal(converted.gate, mapped.gate.to(torch.bfloat16)) and torch.equal(converted.up, mapped.up.to(torch.bfloat16))


def test_converted_load_frees_nothing_twice(checkpoint_factory):
    # bf16 → fp32 must convert tensor by tensor: every result is a fresh fp32 tensor, none mapped.
    from moeserve.loader import load_model

    directory, _ = checkpoint_factory("mixtral", dtype=torch.bfloat16)
    loaded = load_model(directory, torch.device("cpu"), torch.float32)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


def test_fused_expert_layout_is_read(checkpoint_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    directory, hf_model = checkpoint_factory("qwen3_moe")
    tensors = load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    cfg = parse_model_config(config)
    for layer in cfg.moe_layer_ids:
        prefix = f"model.layers.{layer}.mlp.experts"
        gate_up, down = [], []
        for e in range(cfg.num_experts):
            gate = tensors.pop(f"{prefix}.{e}.gate_proj.weight")
            up = tensors.pop(f"{prefix}.{e}.up_proj.weight")
            down.append(tensors.pop(f"{prefix}.{e}.down_proj.weight"))
            gate_up.append(torch.cat([gate, up]))
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{prefix}.down_proj"] = torch.stack(down)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = [4, 8, 15, 16, 23, 42]
    fused, per_expert = LLM(tmp_path, device="cpu").score(ids), LLM(directory, device="cpu").score(ids)
    assert torch.allclose(fused, per_expert, atol=1e-6, rtol=0)


def test_legacy_config_keys_are_understood():
    # transformers 4.x wrote rope_theta at the top level and num_experts for qwen3_moe.
    cfg = parse_model_config(
        {
            "model_type": "qwen3_moe",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "vocab_size": 100,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "intermediate_size": 64,
            "rope_theta": 1000000.0,
            "sliding_window": 4096,
            "use_sliding_window": False,
            "mlp_only_layers": [0],
            "decoder_sparse_step": 1,
            "torch_dtype": "bfloat16",
        }
    )
    assert cfg.rope.theta == 1e6 and cfg.head_dim == 32 and cfg.num_experts == 8
    assert cfg.sliding_windows == (None,) * 4
    assert cfg.moe_layers == (False, True, True, True)
    assert cfg.dtype == torch.bfloat16
