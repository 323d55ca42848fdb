"""A minimal Qwen3-MoE in plain PyTorch, used only to train (and check) the default model.

It computes exactly what transformers' Qwen3MoeForCausalLM computes (RMSNorm, q/k norm per head,
RoPE, GQA, softmax router with renormalised top-k, SwiGLU experts) but dispatches experts by sorting
token slots per expert, which is several times faster on a CPU than a loop of masks. Weights
leave through `hf_state_dict` with HF checkpoint names, so the saved directory is an ordinary
Qwen3-MoE checkpoint; `tests/test_default_model.py` checks transformers agrees on the logits.

Legend for shape comments: B = batch, T = tokens per sequence, N = B*T, D = hidden,
H = query heads, K = key/value heads, Dh = head dim, E = experts, I = expert intermediate, V = vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MoeConfig:
    vocab_size: int = 768
    hidden_size: int = 128
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 256

    def hf_config(self, eos_token_id: int, pad_token_id: int, aux_coef: float) -> dict:
        """config.json of the equivalent transformers Qwen3MoeForCausalLM."""
        fields = asdict(self)
        rope_theta = fields.pop("rope_theta")
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            **fields,
            "intermediate_size": self.moe_intermediate_size,  # unused: every layer is sparse
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "rope_theta": rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
            "initializer_range": 0.02,
            "router_aux_loss_coef": aux_coef,
            "output_router_logits": False,
            "use_cache": True,
            "bos_token_id": None,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            # The compute dtype on load; the tensors are stored in bf16 like real checkpoints. float32
            # on CPU is faster than bf16 and batch-invariant, so `moeserve eval`, the model card, bench
            # and a server all see the same greedy answers.
            "dtype": "float32",
            "torch_dtype": "float32",
        }


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(cfg: MoeConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, Dh] for integer positions [B, T] (HF's rotate_half convention)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
    freqs = positions[..., None].float() * inv_freq  # [B, T, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: MoeConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, -1, self.cfg.head_dim)).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_norm(self.k_proj(x).view(b, t, -1, self.cfg.head_dim)).transpose(1, 2)  # [B, K, T, Dh]
        v = self.v_proj(x).view(b, t, -1, self.cfg.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        # mask None: one sequence per row, plain causal.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SparseMoe(nn.Module):
    def __init__(self, cfg: MoeConfig):
        super().__init__()
        self.cfg = cfg
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = nn.Linear(d, e, bias=False)  # the router
        self.gate_up = nn.Parameter(torch.empty(e, 2 * i, d))  # [E, 2I, D]: gate rows, then up rows
        self.down = nn.Parameter(torch.empty(e, d, i))  # [E, D, I]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (output [N, D], router logits [N, E])."""
        k = self.cfg.num_experts_per_tok
        logits = self.gate(x)  # [N, E]
        probs = logits.float().softmax(-1)
        weights, experts = probs.topk(k, dim=-1)  # [N, k]
        weights = weights / weights.sum(-1, keepdim=True)  # norm_topk_prob
        # Sort the N*k (token, expert) slots by expert so each expert runs one dense matmul.
        order = experts.view(-1).argsort(stable=True)
        counts = torch.bincount(experts.view(-1), minlength=self.cfg.num_experts).tolist()
        token_of_slot = order // k
        xs = x[token_of_slot]  # [N*k, D]
        outs, start = [], 0
        for e, count in enumerate(counts):
            gate, up = F.linear(xs[start:start + count], self.gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.down[e]))
            start += count
        ys = torch.cat(outs) * weights.view(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_slot, ys), logits


class Layer(nn.Module):
    def __init__(self, cfg: MoeConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoe(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        moe_out, router_logits = self.mlp(self.post_attention_layernorm(x).flatten(0, 1))
        return x + moe_out.view_as(x), router_logits


class MoeForCausalLM(nn.Module):
    def __init__(self, cfg: MoeConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        # Residual-branch outputs are scaled by 1/sqrt(2L) so the residual stream's variance does
        # not grow with depth at initialisation (GPT-2's rule).
        residual_std = 0.02 / math.sqrt(2 * self.cfg.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "mlp.down")):
                nn.init.normal_(p, 0.0, residual_std, generator=gen)
            else:
                nn.init.normal_(p, 0.0, 0.02, generator=gen)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """ids [B, T] -> (logits [B, T, V], router logits per layer, each [B*T, E]).

        positions [B, T] and mask [B, 1, T, T] (True = may attend) describe packed or left-padded
        rows (see `packed_layout`, `left_padded_layout`); None means one sequence per row from
        position 0 under a plain causal mask.
        """
        if positions is None:
            positions = torch.arange(ids.shape[1])[None].expand_as(ids)
        cos, sin = rope_tables(self.cfg, positions)
        x = self.embed_tokens(ids)
        router_logits = []
        for layer in self.layers:
            x, logits = layer(x, cos, sin, mask)
            router_logits.append(logits)
        return self.lm_head(self.norm(x)), router_logits

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under Qwen3-MoE checkpoint names (one tensor per expert projection)."""
        out = {"model.embed_tokens.weight": self.embed_tokens.weight, "model.norm.weight": self.norm.weight,
               "lm_head.weight": self.lm_head.weight}
        i = self.cfg.moe_intermediate_size
        for n, layer in enumerate(self.layers):
            pre = f"model.layers.{n}."
            for name in ("input_layernorm", "post_attention_layernorm"):
                out[pre + name + ".weight"] = getattr(layer, name).weight
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
                out[pre + f"self_attn.{name}.weight"] = getattr(layer.self_attn, name).weight
            out[pre + "mlp.gate.weight"] = layer.mlp.gate.weight
            for e in range(self.cfg.num_experts):
                out[pre + f"mlp.experts.{e}.gate_proj.weight"] = layer.mlp.gate_up[e, :i]
                out[pre + f"mlp.experts.{e}.up_proj.weight"] = layer.mlp.gate_up[e, i:]
                out[pre + f"mlp.experts.{e}.down_proj.weight"] = layer.mlp.down[e]
        return {k: v.detach().contiguous() for k, v in out.items()}

    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of hf_state_dict; tensors are cast to this model's dtype (fp32)."""
        mine = self.hf_state_dict()
        if set(mine) != set(tensors):
            raise ValueError(f"checkpoint keys differ: {sorted(set(mine) ^ set(tensors))[:4]}")
        i = self.cfg.moe_intermediate_size
        with torch.no_grad():
            for n, layer in enumerate(self.layers):
                pre = f"model.layers.{n}.mlp.experts."
                for e in range(self.cfg.num_experts):
                    layer.mlp.gate_up[e, :i] = tensors[pre + f"{e}.gate_proj.weight"]
                    layer.mlp.gate_up[e, i:] = tensors[pre + f"{e}.up_proj.weight"]
                    layer.mlp.down[e] = tensors[pre + f"{e}.down_proj.weight"]
            params = dict(self.named_parameters())
            for name, value in tensors.items():
                if ".mlp.experts." in name:
                    continue
                params[name.removeprefix("model.")].copy_(value)


def packed_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and mask for rows holding several examples back to back.

    segments [B, T] numbers the examples within each row; each example attends only to itself
    and restarts at position 0, so it is computed exactly as if it were alone.
    """
    t = segments.shape[1]
    starts = torch.cat([torch.ones_like(segments[:, :1], dtype=torch.bool), segments[:, 1:] != segments[:, :-1]], 1)
    index = torch.arange(t).expand_as(segments)
    start_index = torch.where(starts, index, 0).cummax(1).values
    positions = index - start_index
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    return positions, mask[:, None]


def left_padded_layout(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and mask for left-padded rows; valid [B, T] marks real tokens."""
    t = valid.shape[1]
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = causal & valid[:, None, :]
    mask = mask | torch.eye(t, dtype=torch.bool)  # a padding row attends to itself, avoiding NaN
    return positions, mask[:, None]
