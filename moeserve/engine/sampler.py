"""Logits → next tokens on the compute device: greedy, or temperature / top-k / top-p sampling.

In:  float32 logits [B, V] of the B sequences of a step, on the compute device (CPU or CUDA), and the
     sequences (their params and, when seeded, their own generator on that device).
Out: a `Sampled`: B token ids and, for the rows that asked (`logprobs`), their log-probabilities;
     read back with one device→host transfer per step.

Everything per row is batched: the params travel host→device as one small tensor (pinned and
asynchronous on CUDA), temperature, top-k and top-p are one sort and a few row-wise ops over the
sampled rows, and the chosen tokens plus any requested log-probabilities come back packed in one
float64 tensor (ids below 2**53 and float32 values are exact in it). Greedy rows take `argmax` of the
raw logits, exactly.

Noise. A row is sampled with the exponential race: argmax(p / E) over E ~ Exp(1) i.i.d. draws from p
with one random draw per token. The sampled rows' noise is one [S, V] buffer:
  - unseeded rows share the engine's device generator: one batched `exponential_` over the buffer;
  - a seeded row then overwrites its own row from its own device generator (`Sequence.generator`),
    one launch per seeded row, so what it draws depends only on its seed and its step count, never
    on which requests share the batch.
Why not one launch for every seeded row (a counter-based draw from per-row seeds and Philox offsets as
a tensor)? torch exposes no batched kernel that takes per-row generator states, so that would mean our
own Philox in torch integer ops: ~100 elementwise launches whatever the batch, and an RNG of our own to
validate, against one asynchronous launch per seeded row with torch's tested generator. No launch
waits for the host, so the per-row loop costs launch time only, and only seeded requests pay it.
Top-k and top-p filter the rows sorted once (a stable sort, so ties order deterministically) and
scatter back: every row races in vocabulary order, so its token never depends on its batch-mates' params.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.engine.sequence import Sequence, TokenLogprobs

# Exp(1) draws are clamped to this, so p / E stays finite (p <= 1) and a 0 draw cannot make 0 / 0.
_SMALLEST_NOISE = torch.finfo(torch.float32).tiny


@dataclass
class Sampled:
    tokens: list[int]  # one per sequence
    logprobs: list[TokenLogprobs | None]  # per sequence: None unless its params ask for logprobs


def sample(logits: torch.Tensor, seqs: list[Sequence], default_generator: torch.Generator) -> Sampled:
    """logits [B, V] float32 on the compute device → one token per sequence (+ requested logprobs).
    `default_generator` (on the same device) serves the sampled rows without a seed."""
    tokens = logits.argmax(dim=-1)  # [B]; greedy rows keep this
    sampled_rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
    if sampled_rows:
        sampled_seqs = [seqs[i] for i in sampled_rows]
        params = _row_params(sampled_rows, sampled_seqs, logits.device)  # [4, S]
        rows = params[0].long()  # [S]
        subset = logits if len(sampled_rows) == len(seqs) else logits.index_select(0, rows)  # [S, V]
        noise = _noise(subset.shape, sampled_seqs, default_generator, logits.device)  # [S, V]
        chosen = _race(subset, params[1:], sampled_seqs, noise)  # [S]
        tokens = tokens.index_copy(0, rows, chosen)
    top_n = [seq.params.logprobs for seq in seqs]
    if all(n is None for n in top_n):
        return Sampled(tokens.tolist(), [None] * len(seqs))  # the step's one device→host transfer
    widest = max(n for n in top_n if n is not None)
    packed = torch.cat([tokens.double()[:, None], _logprob_table(logits, tokens, widest)], dim=1)
    host = packed.tolist()  # [B, 2 + 2w]: the step's one device→host transfer
    chosen_ids = [int(row[0]) for row in host]
    return Sampled(chosen_ids, _read_logprobs([row[1:] for row in host], chosen_ids, top_n))


def token_logprobs(logits: torch.Tensor, chosen: list[int], top_n: list[int | None]) -> list[TokenLogprobs | None]:
    """logits [B, V] → for each row with top_n set: {chosen: lp, then the top_n alternatives}."""
    if all(n is None for n in top_n):
        return [None] * len(chosen)
    widest = max(n for n in top_n if n is not None)
    targets = torch.tensor(chosen, device=logits.device)  # [B]
    return _read_logprobs(_logprob_table(logits, targets, widest).tolist(), chosen, top_n)


def _row_params(rows: list[int], seqs: list[Sequence], device: torch.device) -> torch.Tensor:
    """[4, S] float32 on `device`: row index, temperature, top_p, top_k (0 = off); one host→device copy."""
    table = torch.tensor(
        [rows, [s.params.temperature for s in seqs], [s.params.top_p for s in seqs],
         [max(s.params.top_k, 0) for s in seqs]],
        dtype=torch.float32,
    )  # row indices and top_k below 2**24 are exact in float32
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _noise(shape: torch.Size, seqs: list[Sequence], default_generator: torch.Generator, device) -> torch.Tensor:
    """[S, V] Exp(1) draws: the default generator for unseeded rows, each seeded row from its own."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    if any(seq.generator is None for seq in seqs):
        noise.exponential_(generator=default_generator)  # one launch for every unseeded row
    for row, seq in enumerate(seqs):
        if seq.generator is not None:
            noise[row].exponential_(generator=seq.generator)
    return noise.clamp_(min=_SMALLEST_NOISE)


def _race(logits: torch.Tensor, params: torch.Tensor, seqs: list[Sequence], noise: torch.Tensor) -> torch.Tensor:
    """logits [S, V], params [3, S] (temperature, top_p, top_k), noise [S, V] → chosen token ids [S]."""
    temperature, top_p, top_k = params[0][:, None], params[1][:, None], params[2][:, None]  # [S, 1] each
    scaled = logits / temperature  # [S, V]
    if any(s.params.top_k > 0 or s.params.top_p < 1 for s in seqs):
        ranked, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # [S, V] each
        # Back to vocabulary order, so a row races its noise the same way whatever else is in the batch.
        scaled = torch.empty_like(scaled).scatter_(1, order, filter_ranked(ranked, top_k, top_p))
    return (scaled.softmax(dim=-1) / noise).argmax(dim=-1)


def filter_ranked(ranked: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """ranked [S, V] logits in descending order, top_k / top_p [S, 1] → the same with dropped tokens at -inf.

    top-k keeps every token at least as likely as the k-th (ties at the k-th stay); top-p then keeps the
    smallest prefix of the top-k distribution whose mass reaches top_p (the top token always stays)."""
    vocab = ranked.shape[1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).long()  # [S, 1]
    kth = ranked.gather(1, k - 1)  # [S, 1]
    ranked = ranked.masked_fill(ranked < kth, float("-inf"))
    probs = ranked.softmax(dim=-1)  # [S, V]
    mass_before = probs.cumsum(dim=-1) - probs
    # Rows without top-p skip it: rounding can bring a cumulative sum to 1 before the last tokens.
    return ranked.masked_fill((mass_before >= top_p) & (top_p < 1), float("-inf"))


def _logprob_table(logits: torch.Tensor, chosen: torch.Tensor, widest: int) -> torch.Tensor:
    """logits [B, V], chosen [B] → float64 [B, 1 + 2w]: the chosen token's logprob, the top w logprobs,
    their token ids (w = max(widest, 1))."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    top_values, top_ids = logprobs.topk(max(widest, 1), dim=-1)  # [B, w] each
    chosen_lp = logprobs.gather(1, chosen[:, None])  # [B, 1]
    return torch.cat([chosen_lp.double(), top_values.double(), top_ids.double()], dim=1)


def _read_logprobs(rows: list[list[float]], chosen: list[int], top_n: list[int | None]) -> list[TokenLogprobs | None]:
    """Host rows of `_logprob_table` → per row: None, or {chosen: lp, then its top_n alternatives}."""
    width = (len(rows[0]) - 1) // 2
    result: list[TokenLogprobs | None] = []
    for row, token, n in zip(rows, chosen, top_n):
        if n is None:
            result.append(None)
            continue
        entry = {token: row[0]}
        for value, top_id in zip(row[1 : 1 + n], row[1 + width : 1 + width + n]):
            entry.setdefault(int(top_id), value)
        result.append(entry)
    return result
