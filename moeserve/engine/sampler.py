"""Logits → next tokens, per sequence: greedy, or temperature / top-k / top-p sampling.

In:  float32 logits [B, V] for the B sequences of a step (CPU or device), their params.
Out: B token ids, and each sequence's requested log-probabilities.

Each seeded sequence draws from its own generator, so its tokens do not depend on which other
requests share the batch.
"""

from __future__ import annotations

import torch

from moeserve.engine.sequence import Sequence, TokenLogprobs


def sample(logits: torch.Tensor, seqs: list[Sequence], default_generator: torch.Generator) -> list[int]:
    """logits [B, V] float32 → one token id per sequence."""
    tokens = logits.argmax(dim=-1)  # [B]; greedy rows keep this
    sampled_rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        probs = _filtered_probs(logits[rows], [seqs[i].params for i in sampled_rows])  # [S, V]
        for j, i in enumerate(sampled_rows):
            generator = seqs[i].generator or default_generator
            # The exponential race (argmax p / Exp(1)) samples from p with one generator call.
            noise = torch.empty(probs.shape[1], dtype=torch.float32).exponential_(generator=generator)
            tokens[i] = torch.argmax(probs[j].cpu() / noise)
    return tokens.tolist()


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """logits [S, V] → probabilities after temperature, top-k and top-p."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    logits = logits / temps
    top_ks = [p.top_k for p in params]
    if any(k > 0 for k in top_ks):
        vocab = logits.shape[1]
        ks = torch.tensor([k if k > 0 else vocab for k in top_ks], device=logits.device).clamp(max=vocab)
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(1, (ks - 1)[:, None])  # [S, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_ps = torch.tensor([p.top_p for p in params], device=logits.device)[:, None]
    if bool((top_ps < 1).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the top token always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_ps
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def token_logprobs(logits: torch.Tensor, chosen: list[int], top_n: list[int | None]) -> list[TokenLogprobs | None]:
    """logits [B, V] → for each row with top_n set: {chosen: lp, then the top_n alternatives}."""
    if all(n is None for n in top_n):
        return [None] * len(chosen)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    widest = max(n for n in top_n if n is not None)
    top_values, top_ids = logprobs.topk(max(widest, 1), dim=-1)  # [B, widest]
    chosen_lp = logprobs.gather(1, torch.tensor(chosen, device=logits.device)[:, None])[:, 0].tolist()
    result: list[TokenLogprobs | None] = []
    for i, n in enumerate(top_n):
        if n is None:
            result.append(None)
            continue
        entry = {chosen[i]: chosen_lp[i]}
        if n:
            for token, value in zip(top_ids[i, :n].tolist(), top_values[i, :n].tolist()):
                entry.setdefault(token, value)
        result.append(entry)
    return result
