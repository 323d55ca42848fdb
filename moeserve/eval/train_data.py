"""Training batches for the default model: suite items rendered as chats and packed into rows.

In: the suite's training stream, the tokenizer, a step number. Out: a `Batch` of fixed shape.
A batch depends only on (seed, step), so a resumed run sees exactly the batches an uninterrupted
run would. Several examples share a row (no padding waste); `packed_layout` keeps them apart.
The loss covers the answer and its eos only: the numbers in a prompt are random and cannot be
predicted, so training on them would only add noise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from moeserve.eval.chat_format import EOS, PAD, TRAIN_SYSTEM_PROMPTS, render_chat
from moeserve.eval.tasks import Item, train_stream

IGNORE = -100  # label of positions without loss
SYSTEM_SHARE = 0.1  # share of examples that start with a system message
_PAD_SEGMENT = 1 << 20  # segment id of the padding at row ends


@dataclass
class Batch:
    ids: torch.Tensor  # [R, C] token ids
    labels: torch.Tensor  # [R, C] next-token targets, IGNORE outside answers
    segments: torch.Tensor  # [R, C] example number within the row
    real: torch.Tensor  # [R, C] True for example tokens, False for padding
    examples: int


def encode_example(tokenizer: Tokenizer, item: Item, rng: random.Random) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one chat: the prompt, then the answer and eos."""
    messages = [{"role": "user", "content": item.prompt}]
    if rng.random() < SYSTEM_SHARE:
        messages.insert(0, {"role": "system", "content": rng.choice(TRAIN_SYSTEM_PROMPTS)})
    prompt = tokenizer.encode(render_chat(messages), add_special_tokens=False).ids
    answer = tokenizer.encode(item.answer + EOS, add_special_tokens=False).ids
    ids = prompt + answer
    # Position i predicts token i+1: only positions whose next token is in the answer carry loss.
    labels = [IGNORE] * (len(prompt) - 1) + answer + [IGNORE]
    return ids, labels


def make_batch(tokenizer: Tokenizer, seed: int, step: int, rows: int, row_len: int,
               weights: dict[str, float]) -> Batch:
    rng = random.Random(f"{seed}|batch|{step}")
    stream = train_stream(rng, weights)
    pad = tokenizer.token_to_id(PAD)
    ids = [[] for _ in range(rows)]
    labels = [[] for _ in range(rows)]
    segments = [[] for _ in range(rows)]
    examples = misses = 0
    # First fit: each example goes into the first row with room; a few misses mean rows are full.
    while misses < 8:
        x, y = encode_example(tokenizer, next(stream), rng)
        row = next((r for r in range(rows) if len(ids[r]) + len(x) <= row_len), None)
        if row is None:
            misses += 1
            continue
        segments[row] += [examples] * len(x)
        ids[row] += x
        labels[row] += y
        examples += 1
    real = [[True] * len(r) + [False] * (row_len - len(r)) for r in ids]
    for r in range(rows):
        fill = row_len - len(ids[r])
        ids[r] += [pad] * fill
        labels[r] += [IGNORE] * fill
        segments[r] += [_PAD_SEGMENT] * fill
    return Batch(torch.tensor(ids), torch.tensor(labels), torch.tensor(segments), torch.tensor(real), examples)
