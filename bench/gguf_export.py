"""A checkpoint directory (safetensors + config.json, as transformers' save_pretrained writes them) → one GGUF
file that llama.cpp loads, for bench/vs_llamacpp.py. A bench-only tool: needs the `gguf` package
(`pip install gguf`); nothing in moeserve/ imports it.

Families: qwen3_moe (llama.cpp arch "qwen3moe"), qwen2_moe ("qwen2moe") and mixtral ("llama" with expert
tensors). Tensor types: F32, BF16 or F16 for the 2-D weights (default: the dtype moeserve computes this
checkpoint in, config.json's, so that both engines multiply the same numbers); norms, biases and routers are
F32 whatever the type, as llama.cpp's own convert_hf_to_gguf.py writes them.

Layout, following convert_hf_to_gguf.py (llama.cpp's conversion/{base,qwen,llama}.py):
  - names through gguf's TensorNameMap (token_embd, blk.N.attn_q/k/v/output, attn_q_norm/attn_k_norm,
    attn_norm, ffn_norm, ffn_gate_inp, output_norm, output, qwen2_moe's *_shexp);
  - routed experts stacked per layer: ffn_gate_exps / ffn_up_exps [E, I, D], ffn_down_exps [E, D, I] (torch
    order; GGUF stores dimensions reversed, so llama.cpp sees ne = {D, I, E} and {I, D, E});
  - RoPE: llama.cpp runs qwen2moe / qwen3moe with NEOX rope (rotate_half, transformers' own layout), so their
    q/k weights are written as stored. The "llama" arch (mixtral) runs NORM rope, which rotates adjacent
    pairs; its q_proj / k_proj rows are permuted per head (LlamaModel.permute: the two halves of each head
    interleaved), which makes NORM rope on the permuted weights equal rotate_half on the original ones.
  - a vocabulary llama.cpp can load (tokenizer.ggml.model "gpt2"): the checkpoint's tokenizer.json BPE tokens
    and merges when it has them, padded with [PAD<i>] to vocab_size; else a synthetic byte-level list. The
    benchmark feeds token ids, so only loading matters; pre-tokenizer "default".

What llama.cpp cannot express is refused with a sentence (qwen3moe always renormalises the top-k weights,
qwen2moe never does; dense layers between MoE layers; rope scaling; sliding windows).

    python bench/gguf_export.py MODEL_DIR OUT.gguf [--dtype f32|bf16|f16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

try:
    import gguf
except ImportError:  # a bench dependency; the caller says how to install it
    gguf = None

from moeserve.checkpoint import CheckpointTensors
from moeserve.config import ModelConfig, read_config_json
from moeserve.loader import iter_stored_experts, load_config
from moeserve.models import build_model

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


class ExportError(ValueError):
    """The checkpoint cannot be written as a GGUF llama.cpp would run identically."""


def require_gguf():
    if gguf is None:
        raise SystemExit("bench/gguf_export.py needs the gguf package: pip install gguf")
    return gguf


def _arch(model_type: str):
    return {
        "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
        "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
        "mixtral": gguf.MODEL_ARCH.LLAMA,
    }[model_type]


def _qtype(dtype: torch.dtype):
    return {
        torch.float32: gguf.GGMLQuantizationType.F32,
        torch.bfloat16: gguf.GGMLQuantizationType.BF16,
        torch.float16: gguf.GGMLQuantizationType.F16,
    }[dtype]


def _file_type(dtype: torch.dtype):
    return {
        torch.float32: gguf.LlamaFileType.ALL_F32,
        torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16,
        torch.float16: gguf.LlamaFileType.MOSTLY_F16,
    }[dtype]


def check_supported(config: ModelConfig, raw: dict) -> None:
    """Raise ExportError where llama.cpp's graph for the family would compute something else."""
    t = config.model_type
    if t not in FAMILIES:
        raise ExportError(f"model_type {t!r} has no GGUF export here; supported: {', '.join(FAMILIES)}.")
    if not all(config.moe_layers):
        raise ExportError(f"{t}: layers {[i for i, m in enumerate(config.moe_layers) if not m]} are dense MLPs, "
                          f"which llama.cpp's {_arch(t).name.lower()} graph does not run; export a checkpoint whose "
                          f"every layer is a MoE layer.")
    if t == "qwen3_moe" and not config.norm_topk_prob:
        raise ExportError("qwen3_moe with norm_topk_prob false: llama.cpp's qwen3moe always renormalises the top-k weights.")
    if t == "qwen2_moe" and config.norm_topk_prob:
        raise ExportError("qwen2_moe with norm_topk_prob true: llama.cpp's qwen2moe never renormalises the top-k weights.")
    if t == "qwen2_moe" and config.num_heads * config.head_dim != config.hidden_size:
        raise ExportError("qwen2_moe: llama.cpp's qwen2moe needs num_attention_heads * head_dim == hidden_size.")
    if config.rope.kind != "default" or config.rope.rotary_dim != config.head_dim:
        raise ExportError(f"rope {config.rope.kind!r} over {config.rope.rotary_dim} of {config.head_dim} dims: only "
                          f"plain full-head rope is exported.")
    if any(w is not None for w in config.sliding_windows):
        raise ExportError("sliding-window attention is not exported.")
    if config.clip_qkv is not None:
        raise ExportError("clip_qkv is not exported.")
    if config.hidden_act != "silu":
        raise ExportError(f"hidden_act {config.hidden_act!r}: llama.cpp's MoE graphs use SiLU.")
    if t == "qwen2_moe" and not config.shared_expert_intermediate_size:
        raise ExportError("qwen2_moe without a shared expert: llama.cpp's qwen2moe requires one.")


def permute_rows(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: per head, rows [x0..x(d/2-1), y0..y(d/2-1)] → [x0, y0, x1, y1, ...],
    so that NORM (adjacent-pair) rope on the result equals rotate_half rope on `weights`. Rows: heads x head_dim."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges, source) with exactly vocab_size tokens."""
    T = gguf.TokenType
    tokens: list[str | None] = [None] * vocab_size
    types = [T.NORMAL] * vocab_size
    merges: list[str] = []
    source = "synthetic byte-level"
    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text()) if path.is_file() else None
    if spec is not None and spec.get("model", {}).get("type") == "BPE":
        source = "tokenizer.json"
        for text, i in spec["model"].get("vocab", {}).items():
            if i < vocab_size:
                tokens[i] = text
        for added in spec.get("added_tokens", []):
            if added["id"] < vocab_size:
                tokens[added["id"]] = added["content"]
                types[added["id"]] = T.CONTROL if added.get("special") else T.USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    else:
        alphabet = list(_bytes_to_unicode().values())
        for i in range(min(256, vocab_size)):
            tokens[i] = alphabet[i]
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = T.UNUSED if source == "tokenizer.json" else T.NORMAL
    if not merges:  # llama.cpp's BPE loader requires the key; one harmless merge of the first two tokens
        merges = [f"{tokens[0]} {tokens[1] if vocab_size > 1 else tokens[0]}"]
    return tokens, [int(t) for t in types], merges, source


def _np(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """`tensor` converted to `dtype`, as a numpy array the GGUF writer stores byte for byte (bf16 as its
    uint16 bit patterns)."""
    t = tensor.detach().to(dtype).contiguous()
    if dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def export_gguf(model_dir: str | Path, out_path: str | Path, dtype: str | torch.dtype | None = None,
                name: str | None = None, log=print) -> Path:
    """Write `model_dir` as GGUF to `out_path`; dtype None = config.json's (moeserve's compute dtype)."""
    require_gguf()
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = load_config(model_dir)
    raw = read_config_json(model_dir)
    check_supported(config, raw)
    if isinstance(dtype, str):
        if dtype not in TORCH_DTYPES:
            raise ExportError(f"dtype {dtype!r}: choose one of {', '.join(TORCH_DTYPES)}.")
        dtype = TORCH_DTYPES[dtype]
    dtype = dtype or config.dtype
    arch = _arch(config.model_type)
    checkpoint = CheckpointTensors(model_dir)
    meta_model = build_model(config)  # names of the experts in this family's layout; no weights
    name_map = gguf.get_tensor_name_map(arch, config.num_layers)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".part")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    _write_hparams(writer, config, raw, dtype, name or model_dir.name)
    tokens, types, merges, vocab_source = vocabulary(model_dir, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = config.eos_token_ids[0] if config.eos_token_ids else 0
    writer.add_eos_token_id(eos)
    writer.add_bos_token_id(config.bos_token_id if config.bos_token_id is not None else eos)
    writer.add_add_bos_token(False)

    expert_names = set()
    for layer in config.moe_layer_ids:
        expert_names.update(meta_model.fused_expert_tensor_names(layer))
        for e in range(config.num_experts):
            expert_names.update(meta_model.expert_tensor_names(layer, e))

    written: dict[str, tuple[tuple[int, ...], str]] = {}

    def add(gguf_name: str, tensor: torch.Tensor, force_f32: bool = False) -> None:
        t = torch.float32 if force_f32 else dtype
        writer.add_tensor(gguf_name, _np(tensor, t), raw_dtype=_qtype(t))
        written[gguf_name] = (tuple(tensor.shape), DTYPE_NAMES[t])

    names = checkpoint.names()
    for hf_name in names:
        if hf_name in expert_names:
            continue
        new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"tensor {hf_name!r} has no llama.cpp name for arch {arch.name.lower()}.")
        tensor = checkpoint.get(hf_name)
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_rows(tensor, config.num_heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_rows(tensor, config.num_kv_heads)
        f32 = (tensor.dim() <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight")
               or new_name.endswith(("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")))
        add(new_name, tensor, force_f32=f32)
    if "output.weight" not in written:  # tied embeddings: llama.cpp's qwen2moe requires the tensor
        add("output.weight", checkpoint.get("model.embed_tokens.weight"))

    for layer, experts in iter_stored_experts(meta_model, checkpoint, config):
        for key, pick in ((gguf.MODEL_TENSOR.FFN_GATE_EXP, lambda w: w.gate),
                          (gguf.MODEL_TENSOR.FFN_UP_EXP, lambda w: w.up),
                          (gguf.MODEL_TENSOR.FFN_DOWN_EXP, lambda w: w.down)):
            stacked = torch.stack([pick(w).to(dtype) for w in experts])  # [E, I, D] / [E, D, I]
            add(gguf.TENSOR_NAMES[key].format(bid=layer) + ".weight", stacked)
        del experts

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_path)
    log(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB): arch {gguf.MODEL_ARCH_NAMES[arch]}, "
        f"{DTYPE_NAMES[dtype].upper()} weights, {len(written)} tensors, vocab {config.vocab_size} ({vocab_source})")
    return out_path


def _write_hparams(writer, config: ModelConfig, raw: dict, dtype: torch.dtype, name: str) -> None:
    """The keys convert_hf_to_gguf.py writes for these families (TextModel.set_gguf_parameters, then
    Qwen2MoeModel's expert widths, LlamaModel's vocab size and rope dimension)."""
    c = config
    writer.add_name(name)
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    n_ff = raw.get("intermediate_size") or c.moe_intermediate_size
    writer.add_feed_forward_length(int(n_ff))
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_freq_base(float(c.rope.theta))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_expert_count(c.num_experts)
    writer.add_expert_used_count(c.top_k)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_file_type(_file_type(dtype))
    if c.model_type in ("qwen3_moe", "qwen2_moe"):
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if c.model_type == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if c.model_type == "mixtral":
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(c.head_dim)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default=None,
                        help="2-D weight type (default: config.json's dtype, moeserve's compute dtype)")
    args = parser.parse_args(argv)
    try:
        export_gguf(args.model_dir, args.out, args.dtype)
    except ExportError as exc:
        print(f"cannot export {args.model_dir}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
