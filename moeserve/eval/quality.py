"""Task-free quality of a perturbed model against the uncompressed one, and how often each expert is used.

In:  an `LLM`, suite items (prompt + expected answer), an expert provider to compare.
Out: `Quality`: KL divergence KL(reference || perturbed) and top-1 agreement of the next-token
     distributions at every position of the held-out chats, and the perturbed model's perplexity on
     their answer tokens (the eos included). The prompts hold random numbers no model can predict,
     so perplexity is taken where the text is predictable; KL and agreement use every position.
`expert_usage` counts routed slots per (layer, expert) on teacher-forced chats through forward hooks
on the routers; `moeserve bench --experts most-used:K` and the model card read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moeserve.eval.tasks import Item
from moeserve.layers.moe import MoeBlock


@dataclass(frozen=True)
class Quality:
    kl: float  # nats per position, mean over positions
    top1_agreement: float  # share of positions whose argmax matches the reference
    perplexity: float  # exp(mean NLL) of answer tokens


@dataclass
class _Text:
    ids: list[int]
    answer_start: int  # index of the first answer token in ids


class QualityProbe:
    """Scores a fixed set of chats once with the model's own experts, then any provider against them."""

    def __init__(self, llm, items: list[Item]):
        if llm.tokenizer is None:
            raise ValueError("quality measures need the model's tokenizer.json")
        self.llm = llm
        self.texts = [_chat_text(llm.tokenizer, item) for item in items]
        # float64: KL of nearly equal distributions is a small difference of large sums.
        self.reference = [torch.log_softmax(llm.score(t.ids).double(), dim=-1) for t in self.texts]  # each [T, V]
        self.baseline = self._compare(self.reference)

    def measure(self, experts) -> Quality:
        return self._compare([torch.log_softmax(self.llm.score(t.ids, experts).double(), dim=-1) for t in self.texts])

    def _compare(self, logprobs: list[torch.Tensor]) -> Quality:
        kl_sum = agree = positions = 0.0
        nll_sum = answer_tokens = 0.0
        for text, ref, got in zip(self.texts, self.reference, logprobs):
            kl_sum += (ref.exp() * (ref - got)).sum().item()  # sum over positions of KL(ref || got)
            agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
            positions += ref.shape[0]
            # Row t predicts token t+1: the answer's tokens are predicted by rows answer_start-1 .. T-2.
            targets = torch.tensor(text.ids[text.answer_start:])
            rows = got[text.answer_start - 1 : len(text.ids) - 1]  # [A, V]
            nll_sum -= rows.gather(1, targets[:, None]).sum().item()
            answer_tokens += len(targets)
        return Quality(kl_sum / positions, agree / positions, math.exp(nll_sum / answer_tokens))


def _chat_text(tokenizer, item: Item) -> _Text:
    prompt = tokenizer.encode_chat([{"role": "user", "content": item.prompt}])
    full = tokenizer.encode_chat(
        [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": item.answer}],
        add_generation_prompt=False,
    )
    if full[: len(prompt)] != prompt or len(full) <= len(prompt):
        raise ValueError("the chat template does not render the answer after the generation prompt")
    return _Text(full, len(prompt))


@torch.no_grad()
def expert_usage(llm, items: list[Item]) -> dict[int, list[int]]:
    """Routed slots per expert of each MoE layer over the teacher-forced chats of `items`."""
    counts = {layer: torch.zeros(llm.config.num_experts, dtype=torch.long) for layer in llm.config.moe_layer_ids}
    handles = []
    for module in llm.model.modules():
        if isinstance(module, MoeBlock):
            handles.append(module.router_module.register_forward_hook(_counter(counts[module.layer_id])))
    try:
        for item in items:
            llm.score(_chat_text(llm.tokenizer, item).ids)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: c.tolist() for layer, c in counts.items()}


def _counter(counts: torch.Tensor):
    def hook(module, inputs, routed):  # routed: (weights [T, K], expert ids [T, K])
        chosen = routed[1].flatten().cpu()
        counts.add_(torch.bincount(chosen, minlength=counts.numel()))

    return hook
