"""Multi-head latent attention (DeepSeek-V2/V3) over a KV cache that holds only the latent.

In:  hidden states [T, D] of the step and its `StepContext` (prefill/extend) or `DecodeContext`.
Out: [T, D]. Side effect: each new token's latent (the normalised kv_lora_rank values, then the
     rotated qk_rope_head_dim key shared by all heads) is written into the cache's blocks; no per-head
     K or V is ever stored.

Prefill/extend steps expand the cached latents into per-head K and V with kv_b_proj, exactly as
transformers does, so scoring matches it. Decode steps instead fold kv_b_proj into the query and
the output (DeepSeek's "absorbed" form): attention then runs over the latents themselves, so a
decode step costs O(cached tokens x latent) rather than re-expanding every cached token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.config import ModelConfig
from moeserve.kv.context import DecodeContext, StepContext
from moeserve.layers.linear import Linear
from moeserve.layers.norms import RMSNorm
from moeserve.layers.paged_attention import paged_decode_attention
from moeserve.layers.rotary import ROTARY_LAYOUTS

# Legend: T = tokens in the step, B = sequences, H = heads, L = cached positions attended to,
# R = kv_lora_rank, Dr = qk_rope_head_dim, Dn = qk_nope_head_dim, Dv = v_head_dim.


class MlaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        mla = config.mla
        self.layer_id = layer_id
        self.num_heads = config.num_heads
        self.rank, self.rope_dim = mla.kv_lora_rank, mla.qk_rope_head_dim
        self.nope_dim, self.v_dim = mla.qk_nope_head_dim, mla.v_head_dim
        self.scale = mla.softmax_scale
        self.rotate = ROTARY_LAYOUTS[config.rope.layout]
        hidden, bias, q_size = config.hidden_size, config.attention_bias, config.num_heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = Linear(hidden, q_size, bias=False)
        else:
            self.q_a_proj = Linear(hidden, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, 1e-6)  # transformers builds it with its default eps
            self.q_b_proj = Linear(mla.q_lora_rank, q_size, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, mla.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(mla.kv_lora_rank, config.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = Linear(config.num_heads * mla.v_head_dim, hidden, bias=bias)
        self.has_q_lora = mla.q_lora_rank is not None

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: StepContext | DecodeContext
    ) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.has_q_lora else self.q_proj(x)
        q_nope, q_rot = q.view(T, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)  # [T, H, Dn|Dr]
        kv_latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)  # [T, R], [T, Dr]
        cos, sin = rope
        q_rot = self.rotate(q_rot, cos, sin)  # [T, H, Dr]
        k_rot = self.rotate(k_rot.unsqueeze(1), cos, sin)  # [T, 1, Dr]
        latent = torch.cat((self.kv_a_layernorm(kv_latent), k_rot[:, 0]), dim=-1)  # [T, R + Dr]
        if ctx.is_decode:
            out = self._decode(q_nope, q_rot, latent, ctx)
        else:
            out = self._extend(q_nope, q_rot, latent, ctx)
        return self.o_proj(out.reshape(T, self.num_heads * self.v_dim))

    def _kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's two halves per head: W_UK [H, Dn, R] (latent → key) and W_UV [H, Dv, R] (latent → value)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _decode(self, q_nope, q_rot, latent, ctx: DecodeContext) -> torch.Tensor:
        cache, layer = ctx.cache, self.layer_id
        group = cache.group_of_layer[layer]
        cache.write(layer, ctx.slots[group], latent.unsqueeze(1), None)  # [B, 1, R + Dr] at each sequence's position
        w_uk, w_uv = self._kv_b()
        q_latent = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)  # [B, H, R]: q_nope · (W_UK · latent)
        query = torch.cat((q_latent, q_rot), dim=-1)  # [B, H, R + Dr]
        if ctx.use_kernel:
            # the values are the latents themselves (their first R entries), expanded after the sum
            out_latent = paged_decode_attention(
                query, cache.keys(layer), None, ctx.tables[group], ctx.positions, self.scale, None, None, value_dim=self.rank
            )  # [B, H, R]
        else:
            outputs = []
            for part in ctx.parts:
                keys, _ = ctx.read(layer, group, part, None)  # [n, 1, L, R + Dr]
                out = F.scaled_dot_product_attention(
                    query[part.start : part.end].unsqueeze(2),  # [n, H, 1, R + Dr]
                    keys,
                    keys[..., : self.rank],  # the values are the latents themselves, expanded after the sum
                    attn_mask=ctx.mask(None, part),
                    scale=self.scale,
                    enable_gqa=True,
                )  # [n, H, 1, R]
                outputs.append(out[:, :, 0])
            out_latent = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return torch.einsum("bhr,hvr->bhv", out_latent, w_uv)  # [B, H, Dv]

    def _extend(self, q_nope, q_rot, latent, ctx: StepContext) -> torch.Tensor:
        cache, layer = ctx.cache, self.layer_id
        group = cache.group_of_layer[layer]
        cache.write(layer, ctx.slots[group], latent.unsqueeze(1), None)  # [T, 1, R + Dr]
        query = torch.cat((q_nope, q_rot), dim=-1)  # [T, H, Dn + Dr]
        outputs = []
        start = 0
        for i, (cached, new) in enumerate(zip(ctx.cached_lens, ctx.query_lens)):
            end, total = start + new, cached + new
            # a continued sequence reads its earlier latents back from its blocks
            latents = ctx.read(layer, i, group)[0][:, 0] if cached else latent[start:end]  # [L, R + Dr]
            kv_latent, k_rot = latents.split([self.rank, self.rope_dim], dim=-1)  # [L, R], [L, Dr]
            kv = self.kv_b_proj(kv_latent).view(total, self.num_heads, -1)  # [L, H, Dn + Dv]
            k_nope, values = kv.split([self.nope_dim, self.v_dim], dim=-1)
            keys = torch.cat((k_nope, k_rot.unsqueeze(1).expand(-1, self.num_heads, -1)), dim=-1)  # [L, H, Dn + Dr]
            mask = ctx.mask(i, None, query.dtype)  # made once a step for every layer
            out = F.scaled_dot_product_attention(
                query[start:end].transpose(0, 1).unsqueeze(0),  # [1, H, new, Dn + Dr]
                keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0),  # [1, H, L, Dv]
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.scale,
            )  # [1, H, new, Dv]
            outputs.append(out[0].transpose(0, 1))  # [new, H, Dv]
            start = end
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
