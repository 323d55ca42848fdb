"""How the router spreads tokens over experts: the share of routed slots each expert receives.

In: a training-model instance, tokenizer and suite items. Out: `shares[layer][expert]`, each row
summing to 1 (a token routed top-2 fills two slots). Every token of each chat (prompt, answer and
eos) is counted, teacher-forced, the way training and prefill see it.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from moeserve.eval.chat_format import EOS, render_chat
from moeserve.eval.tasks import Item
from moeserve.eval.train_model import MoeForCausalLM


@torch.no_grad()
def expert_shares(model: MoeForCausalLM, tokenizer: Tokenizer, items: list[Item]) -> list[list[float]]:
    cfg = model.cfg
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts)
    for item in items:
        text = render_chat([{"role": "user", "content": item.prompt}]) + item.answer + EOS
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False).ids])
        _, router_logits = model(ids)
        for layer, logits in enumerate(router_logits):  # [T, E]
            chosen = logits.topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
            counts[layer] += torch.bincount(chosen, minlength=cfg.num_experts).float()
    return (counts / counts.sum(-1, keepdim=True)).tolist()
