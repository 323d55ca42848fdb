"""Attention with sinks (gpt_oss): a learned logit per head joins each query's softmax, then is dropped.

In:  queries [B, H, Q, Dh], cached keys and values [B, G, L, Dh], which keys each query may see
     ([B or 1, 1, Q, L] bool, None = all) and the sinks [H].
Out: [B, H, Q, Dh].

The sink takes a share of the probability mass without contributing a value, so a head can attend
to "nothing". The arithmetic follows transformers' eager gpt_oss attention op for op (scores in the
compute dtype, max subtracted, softmax in that dtype); GQA is computed per kv head group instead of
repeating K and V, so decoding never copies the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sink_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None, sinks: torch.Tensor
) -> torch.Tensor:
    B, H, Q, Dh = query.shape
    G, L = keys.shape[1], keys.shape[2]
    grouped = query.reshape(B, G, (H // G) * Q, Dh)  # heads g*r .. g*r+r-1 share kv head g, as repeat_kv does
    scores = (torch.matmul(grouped, keys.transpose(2, 3)) * Dh**-0.5).view(B, H, Q, L)  # [B, H, Q, L]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    combined = torch.cat((scores, sinks.reshape(1, H, 1, 1).expand(B, H, Q, 1)), dim=-1)  # [B, H, Q, L+1]
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(values.dtype)  # the sink is dropped
    out = torch.matmul(probs.reshape(B, G, (H // G) * Q, L), values)  # [B, G, r*Q, Dh]
    return out.view(B, H, Q, Dh)
