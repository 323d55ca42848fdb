"""Self-attention over the KV cache, for prefill/extend steps and batched decode steps.

In:  hidden states [T, D] of the step and its `StepContext` (prefill/extend) or `DecodeContext`.
Out: [T, D]. Side effect: this step's K/V are written into the cache's blocks.

K and V go to the paged cache (kv/cache.py) through the step's block tables. Sliding-window layers'
masks (prefill, extend and decode alike) let a query see only the last `window` keys, and their blocks
leave the cache once no query can see them (kv/blocks.py). A decode step writes and reads through
device tensors only, over a bucketed span of positions (kv/context.py), so its cost does not depend on
having seen a length before; on a GPU its attention reads the blocks in place
(layers/paged_attention.py), elsewhere it gathers them into a workspace. Layers with sinks (gpt_oss) attend through
layers/sinks.py, every other layer through torch's SDPA.

An extend step (a prompt's later chunk, or a prompt after a prefix-cache hit) has queries that see all the
cached positions and, causally, the new ones. Its mask is made once a step (`StepContext.mask`). On a CPU,
in float32 or float64 and where no sliding window cuts in, it runs without one (`prefix_then_causal`):
torch's CPU flash attention of the new queries over the cached keys (no mask: every query sees them all)
and over the new keys (is_causal: the kernel skips the blocks above the diagonal), the two merged exactly
by their log-sum-exps. A masked call computes every block of the new queries against every key and adds
the mask to each; this computes only the blocks a query sees.
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
from moeserve.layers.rotary import apply_rotary
from moeserve.layers.sinks import sink_attention

# Legend: T = tokens in the step, B = sequences, H = query heads, G = kv heads, Dh = head dim,
# L = cached positions attended to.


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_windows[layer_id]
        self.clip_qkv = config.clip_qkv
        self.qk_norm = config.qk_norm
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, q_size, bias=bias)
        self.k_proj = Linear(config.hidden_size, kv_size, bias=bias)
        self.v_proj = Linear(config.hidden_size, kv_size, bias=bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.attention_output_bias)
        # [H] learned logits (gpt_oss), see layers/sinks.py; None = plain softmax attention.
        self.sinks = None
        if config.attention_sinks:
            self.sinks = nn.Parameter(torch.empty(config.num_heads), requires_grad=False)
        if self.qk_norm == "per_head":
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        elif self.qk_norm == "full":
            self.q_norm = RMSNorm(q_size, config.rms_norm_eps)
            self.k_norm = RMSNorm(kv_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: StepContext | DecodeContext
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, H*Dh], [T, G*Dh], [T, G*Dh]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if ctx.is_decode:
            out = self._decode(q, k, v, ctx)
        else:
            out = self._extend(q, k, v, ctx)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        cache, layer = ctx.cache, self.layer_id
        group = cache.group_of_layer[layer]
        cache.write(layer, ctx.slots[group], k, v)  # [B, G, Dh] at each sequence's position
        if ctx.use_kernel:
            return paged_decode_attention(
                q, cache.keys(layer), cache.values(layer), ctx.tables[group], ctx.positions, self.head_dim**-0.5,
                self.window, self.sinks,
            )  # [B, H, Dh]
        if len(ctx.parts) == 1:  # the usual case: every row reads the same span
            (part,) = ctx.parts
            keys, values = ctx.read(layer, group, part, self.window)  # [B, G, L, Dh]
            return self._attend(q.unsqueeze(2), keys, values, ctx.mask(self.window, part)).squeeze(2)  # [B, H, Dh]
        outputs = []
        for part in ctx.parts:
            keys, values = ctx.read(layer, group, part, self.window)  # [n, G, L, Dh]
            query = q[part.start : part.end].unsqueeze(2)  # [n, H, 1, Dh]
            outputs.append(self._attend(query, keys, values, ctx.mask(self.window, part)))  # [n, H, 1, Dh]
        return torch.cat(outputs).squeeze(2)

    def _attend(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """Decode: query [B, H, Q, Dh] over keys / values [B, G, L, Dh]; allowed: the positions each query sees."""
        if self.sinks is not None:
            return sink_attention(query, keys, values, allowed, self.sinks)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, enable_gqa=True)

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        cache, layer = ctx.cache, self.layer_id
        group = cache.group_of_layer[layer]
        cache.write(layer, ctx.slots[group], k, v)  # [T, G, Dh]
        outputs = []
        start = 0
        for i, (cached, new) in enumerate(zip(ctx.cached_lens, ctx.query_lens)):
            end = start + new
            # a sequence that continues reads its earlier positions back from its blocks
            keys, values = ctx.read(layer, i, group) if cached else (k[start:end], v[start:end])  # [total, G, Dh]
            query = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, new, Dh]
            keys, values = keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)  # [1, G, total, Dh]
            if self.sinks is not None:
                out = sink_attention(query, keys, values, ctx.allowed(i, self.window), self.sinks)
            elif cached and splits_at_the_prefix(query, self.window, cached + new):
                out = prefix_then_causal(query, keys, values, cached)  # [1, H, new, Dh]
            else:
                mask = ctx.mask(i, self.window, q.dtype)  # made once a step for every layer
                out = F.scaled_dot_product_attention(
                    query, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True
                )  # [1, H, new, Dh]
            outputs.append(out[0].transpose(0, 1))  # [new, H, Dh]
            start = end
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


# torch's CPU flash attention, which also returns each query's log-sum-exp (None where this torch lacks it)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def splits_at_the_prefix(query: torch.Tensor, window: int | None, total: int) -> bool:
    """Whether an extend step's attention may run as `prefix_then_causal`: on a CPU, in a dtype whose partial
    results merge within its own rounding (float32, float64: the kernel returns each part in the query's dtype,
    so a bfloat16 merge would round twice), and with no sliding window cutting into the `total` positions."""
    return (
        _CPU_FLASH is not None
        and query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.float64)
        and (window is None or window >= total)
    )


def prefix_then_causal(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cached: int) -> torch.Tensor:
    """query [1, H, new, Dh] at positions cached..cached+new-1 over keys / values [1, G, cached+new, Dh] (G
    dividing H), causal: the same as masked SDPA within float rounding, without a mask. Every new query sees
    every cached key, so that part needs no mask; the new keys need plain causal attention. Each part's softmax
    is normalised by its own log-sum-exp L; the whole one's weighs them by exp(L_part) / (exp(L1) + exp(L2)),
    i.e. sigmoid(L1 - L2) for the cached part."""
    past, past_lse = _CPU_FLASH(query, keys[:, :, :cached], values[:, :, :cached])  # [1, H, new, Dh], [1, H, new]
    now, now_lse = _CPU_FLASH(query, keys[:, :, cached:], values[:, :, cached:], is_causal=True)
    return torch.lerp(now, past, torch.sigmoid(past_lse - now_lse).unsqueeze(-1))
