"""Greedy decoding with the training model, shaped like `LLM.chat`.

In: conversations (lists of messages). Out: one completion per conversation (text, token ids).
It lets training measure accuracy through the same `evaluate` the engine is measured with, and
gives tests an independent reference for the engine's answers. CPU, fp32, no KV cache: every step
re-runs the whole (short) sequence, which is simple and fast enough for prompts of ~50 tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from moeserve.eval.chat_format import EOS, PAD, render_chat
from moeserve.eval.train_model import MoeConfig, MoeForCausalLM, left_padded_layout


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated ids, the final eos included


class ReferenceRunner:
    def __init__(self, model: MoeForCausalLM, tokenizer: Tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_id = tokenizer.token_to_id(EOS)
        self.pad_id = tokenizer.token_to_id(PAD)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ReferenceRunner:
        """Load a checkpoint written by train_default (any dtype on disk; computes in fp32)."""
        model_dir = Path(model_dir)
        hf = json.loads((model_dir / "config.json").read_text())
        cfg = MoeConfig(**{f.name: hf[f.name] for f in fields(MoeConfig)})
        model = MoeForCausalLM(cfg)
        model.load_hf_state_dict({k: v.float() for k, v in load_file(model_dir / "model.safetensors").items()})
        return cls(model.eval(), Tokenizer.from_file(str(model_dir / "tokenizer.json")))

    def chat(self, conversations: list[list[dict[str, str]]], params) -> list[Completion]:
        """Greedy completions; only `params.max_tokens` is read (decoding is always greedy)."""
        prompts = [self.tokenizer.encode(render_chat(c), add_special_tokens=False).ids for c in conversations]
        # Similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, ids in zip(chunk, self._greedy([prompts[i] for i in chunk], params.max_tokens)):
                results[i] = Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids)
        return results

    @torch.no_grad()
    def _greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        width = max(map(len, prompts))
        # Left padding keeps every prompt's last token in the last column.
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])  # [B, T]
        valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
        done = torch.zeros(len(prompts), dtype=torch.bool)
        for _ in range(max_tokens):
            logits, _ = self.model(ids, *left_padded_layout(valid))
            nxt = logits[:, -1].argmax(-1)  # [B]
            nxt = torch.where(done, self.pad_id, nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            valid = torch.cat([valid, (~done)[:, None]], dim=1)
            done |= nxt == self.eos_id
            if done.all():
                break
        out = []
        for row in ids[:, width:].tolist():
            out.append(row[: row.index(self.eos_id) + 1] if self.eos_id in row else row)
        return out
