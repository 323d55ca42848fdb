"""The loader maps safetensors files instead of copying them, and reads every layout."""

from __future__ import annotations

import ctypes
import json

import pytest
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
    # a view of the mapped file; any other is copied once, to memory that starts aligned (alignment.py). (Weights
    # of 2 MiB or more are copied to huge pages whatever their alignment: the next test.)
    from moeserve.alignment import is_aligned
    from moeserve.loader import iter_stored_experts, load_dense_experts, load_model

    # in bf16 this checkpoint's file starts some tensors on a 64-byte boundary and some not (asserted below)
    directory, _ = checkpoint_factory("qwen3_moe", dtype=torch.bfloat16)
    loaded = load_model(directory, torch.device("cpu"))
    experts = load_dense_experts(loaded, torch.device("cpu"))
    checkpoint = loaded.checkpoint
    pairs = [(p, checkpoint.get(name)) for name, p in loaded.model.named_parameters()]  # (loaded, as stored)
    expert_pairs = []  # the routed experts are copied into the stack whatever their alignment
    for layer, stored in iter_stored_experts(loaded.model, checkpoint, loaded.config):
        for loaded_w, stored_w in zip(experts._experts[layer], stored):
            expert_pairs += [(loaded_w.gate_up, stored_w.gate_up), (loaded_w.down, stored_w.down)]
    stored_starts = {is_aligned(stored) for _, stored in pairs + expert_pairs}
    assert stored_starts == {True, False}, "the checkpoint exercises both cases"
    for tensor, stored in pairs:
        assert (tensor.data_ptr() == stored.data_ptr()) == is_aligned(stored), "mapped exactly where aligned"
    for tensor, stored in pairs + expert_pairs:
        assert is_aligned(tensor) and torch.equal(tensor, stored)


def test_large_cpu_weights_are_copied_to_huge_pages_and_a_tied_lm_head_shares_the_embeddings(checkpoint_factory):
    from moeserve import huge_pages
    from moeserve.loader import load_model

    vocab = huge_pages.MIN_BYTES // (32 * 4)  # embeddings of hidden 32 in float32: exactly MIN_BYTES
    directory, _ = checkpoint_factory("qwen3_moe", vocab_size=vocab, tie_word_embeddings=True)
    model = load_model(directory, torch.device("cpu")).model
    embeddings = model.get_parameter("model.embed_tokens.weight")
    lm_head = dict(model.named_parameters(remove_duplicate=False)).get("lm_head.weight", embeddings)
    assert lm_head.data_ptr() == embeddings.data_ptr()  # one copy, not two
    if hasattr(huge_pages.mmap, "MADV_HUGEPAGE"):
        assert embeddings.data_ptr() % huge_pages.HUGE_PAGE == 0
    stored = CheckpointTensors(directory).get("model.embed_tokens.weight")
    assert torch.equal(embeddings, stored) and embeddings.data_ptr() != stored.data_ptr()


@pytest.mark.parametrize("model_type,prefix,names", [
    ("qwen3_moe", "model.layers.0.mlp.experts.1.", ("gate_proj", "up_proj", "down_proj")),  # gate right before up
    ("mixtral", "model.layers.0.block_sparse_moe.experts.1.", ("w1", "w3", "w2")),  # w1 (gate), w3 (up) apart
])
def test_resident_experts_are_stacked_with_gate_and_up_fused_whatever_the_checkpoint_layout(
    checkpoint_factory, model_type, prefix, names
):
    # A same-dtype load on the CPU could compute the experts where they are mapped; it stacks them anyway (a
    # compiled step computes a stacked layer in two calls), gate and up fused, as a converting load does.
    from safetensors.torch import load_file

    from moeserve.loader import load_dense_experts, load_model

    directory, _ = checkpoint_factory(model_type)
    stored = load_file(directory / "model.safetensors")
    for dtype in (None, torch.bfloat16):
        experts = load_dense_experts(load_model(directory, torch.device("cpu"), dtype), torch.device("cpu"))
        w = experts.expert(0, 1)
        assert experts.stacked(0) is not None and w.gate_up is not None
        assert w.gate_up.dtype == (dtype or torch.float32)
        for got, name in zip((w.gate, w.up, w.down), names):
            assert torch.equal(got, stored[prefix + name + ".weight"].to(got.dtype))


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
