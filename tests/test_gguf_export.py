"""bench/gguf_export.py: tiny checkpoints written as GGUF and read back with gguf's own reader (names, shapes,
types, hyperparameters, values), and the mixtral q/k permutation checked against rope itself. Needs the `gguf`
package (a bench dependency, skipped without it); never llama.cpp."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # last: bench/codecs.py must not shadow anything

from gguf_export import ExportError, export_gguf, permute_rows  # noqa: E402

from moeserve.checkpoint import CheckpointTensors  # noqa: E402

F32, BF16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16


def read(path: Path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def expected_names(layers: int) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    per_layer = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "ffn_norm",
                 "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    return names | {f"blk.{i}.{n}.weight" for i in range(layers) for n in per_layer}


def test_qwen3_moe_names_shapes_types_and_hparams(checkpoint_factory, tmp_path):
    directory, hf = checkpoint_factory("qwen3_moe")
    c = hf.config
    out = export_gguf(directory, tmp_path / "m.gguf", log=lambda *a: None)  # float32 checkpoint: F32
    fields, tensors = read(out)
    assert fields["general.architecture"] == "qwen3moe"
    assert set(tensors) == expected_names(c.num_hidden_layers)
    d, i, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    ne = {  # ggml order: the torch shape reversed
        "token_embd.weight": [d, c.vocab_size], "output.weight": [d, c.vocab_size], "output_norm.weight": [d],
        "blk.0.attn_q.weight": [d, c.num_attention_heads * hd], "blk.0.attn_k.weight": [d, c.num_key_value_heads * hd],
        "blk.0.attn_output.weight": [c.num_attention_heads * hd, d], "blk.0.attn_q_norm.weight": [hd],
        "blk.0.ffn_gate_inp.weight": [d, e], "blk.0.ffn_gate_exps.weight": [d, i, e],
        "blk.0.ffn_up_exps.weight": [d, i, e], "blk.0.ffn_down_exps.weight": [i, d, e],
    }
    for name, shape in ne.items():
        assert list(tensors[name].shape) == shape, name
    assert {t.tensor_type for t in tensors.values()} == {F32}
    arch = "qwen3moe"
    assert fields[f"{arch}.block_count"] == c.num_hidden_layers
    assert fields[f"{arch}.embedding_length"] == d
    assert fields[f"{arch}.context_length"] == c.max_position_embeddings
    assert fields[f"{arch}.attention.head_count"] == c.num_attention_heads
    assert fields[f"{arch}.attention.head_count_kv"] == c.num_key_value_heads
    assert fields[f"{arch}.attention.key_length"] == hd
    assert fields[f"{arch}.attention.value_length"] == hd
    assert fields[f"{arch}.expert_count"] == e
    assert fields[f"{arch}.expert_used_count"] == c.num_experts_per_tok
    assert fields[f"{arch}.expert_feed_forward_length"] == i
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(c.rope_parameters["rope_theta"])
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"]) == c.vocab_size
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32

    # Values: expert e of layer 1 is slice e of the stacked tensors (numpy views in torch order).
    ckpt = CheckpointTensors(directory)
    for proj, gguf_name in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
        stacked = torch.from_numpy(tensors[f"blk.1.{gguf_name}.weight"].data.copy())
        for expert in range(e):
            assert torch.equal(stacked[expert], ckpt.get(f"model.layers.1.mlp.experts.{expert}.{proj}.weight"))
    assert torch.equal(torch.from_numpy(tensors["blk.0.attn_q.weight"].data.copy()),
                       ckpt.get("model.layers.0.self_attn.q_proj.weight"))  # NEOX rope: no permutation


def test_bf16_weights_keep_norms_and_routers_float32(checkpoint_factory, tmp_path):
    directory, hf = checkpoint_factory("qwen3_moe", dtype=torch.bfloat16)
    out = export_gguf(directory, tmp_path / "m.gguf", log=lambda *a: None)  # the checkpoint's bf16
    fields, tensors = read(out)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    for name, t in tensors.items():
        f32 = name.endswith(("norm.weight", "ffn_gate_inp.weight"))
        assert t.tensor_type == (F32 if f32 else BF16), name
    ckpt = CheckpointTensors(directory)
    bits = torch.from_numpy(tensors["blk.2.ffn_down_exps.weight"].data.copy()).view(torch.bfloat16)
    assert torch.equal(bits[3], ckpt.get("model.layers.2.mlp.experts.3.down_proj.weight"))
    _, as_f32 = read(export_gguf(directory, tmp_path / "f.gguf", "f32", log=lambda *a: None))
    assert {t.tensor_type for t in as_f32.values()} == {F32}


def rope(x: torch.Tensor, pos: int, theta: float, interleaved: bool) -> torch.Tensor:
    """x [H, hd] rotated at position `pos`: rotate_half (NEOX, transformers) or adjacent pairs (NORM)."""
    hd = x.shape[-1]
    freqs = pos / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = freqs.cos(), freqs.sin()
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def test_mixtral_permutation_turns_norm_rope_into_rotate_half(checkpoint_factory, tmp_path):
    directory, hf = checkpoint_factory("mixtral")
    c = hf.config
    hd = c.hidden_size // c.num_attention_heads
    fields, tensors = read(export_gguf(directory, tmp_path / "m.gguf", log=lambda *a: None))
    assert fields["general.architecture"] == "llama"
    assert fields["llama.rope.dimension_count"] == hd
    assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"} <= set(tensors)
    ckpt = CheckpointTensors(directory)
    x = torch.randn(c.hidden_size, dtype=torch.float64)
    for proj, heads in (("q_proj", c.num_attention_heads), ("k_proj", c.num_key_value_heads)):
        original = ckpt.get(f"model.layers.0.self_attn.{proj}.weight").double()
        written = torch.from_numpy(tensors[f"blk.0.attn_{proj[0]}.weight"].data.copy()).double()
        assert torch.equal(written, permute_rows(original, heads))
        # transformers: rotate_half on the original rows; llama.cpp: adjacent pairs on the written ones. Per head,
        # the two give the same vector up to the order of its dims, the same permutation on q and k, so equal dots.
        hf_q = rope((original @ x).view(heads, hd), 7, c.rope_parameters["rope_theta"], interleaved=False)
        ll_q = rope((written @ x).view(heads, hd), 7, c.rope_parameters["rope_theta"], interleaved=True)
        assert torch.allclose(permute_rows(hf_q.reshape(-1, 1), heads).view(heads, hd), ll_q)


def test_what_llama_cpp_cannot_run_is_refused(checkpoint_factory, tmp_path):
    directory, _ = checkpoint_factory("qwen2_moe")  # mlp_only_layers=[1]: a dense layer between MoE layers
    with pytest.raises(ExportError, match="dense MLPs"):
        export_gguf(directory, tmp_path / "m.gguf", log=lambda *a: None)
    directory, _ = checkpoint_factory("qwen3_moe", norm_topk_prob=False)
    with pytest.raises(ExportError, match="renormalises"):
        export_gguf(directory, tmp_path / "n.gguf", log=lambda *a: None)
