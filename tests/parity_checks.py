"""Comparisons with transformers shared by the parity tests of every family."""

from __future__ import annotations

import torch

# bf16 keeps 8 bits of mantissa: a logit may be off by a few ulps of the logit scale.
BF16_ULPS = 4 * 2**-8


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """transformers' float32 logits [T, vocab] for one sequence."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def hf_greedy(hf_model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation of `prompt` and the logits [n, vocab] each token was chosen from."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits).float()


def bf16_tolerance(reference_logits: torch.Tensor) -> float:
    return BF16_ULPS * reference_logits.abs().max().item()


def first_near_tie(logits: torch.Tensor, tolerance: float) -> int:
    """The first row of logits [n, vocab] whose top two are closer than `tolerance`, where a rounding
    difference the logits check admits can swap them; n when there is none."""
    top2 = torch.topk(logits, 2, dim=-1).values  # [n, 2]
    close = ((top2[:, 0] - top2[:, 1]) < tolerance).nonzero()
    return int(close[0, 0]) if len(close) else logits.shape[0]


def assert_bf16_generation_matches(llm, hf_model, prompt: list[int], n: int) -> None:
    """Reduced-precision greedy decoding may legitimately fork where transformers' own top two logits
    tie within the dtype's resolution. So: our tokens equal transformers' up to its first near-tie, and
    our logits over transformers' whole continuation (past any fork) stay within the bf16 tolerance."""
    from moeserve import SamplingParams

    hf_tokens, hf_step_logits = hf_greedy(hf_model, prompt, n)
    ours = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].token_ids
    agree = first_near_tie(hf_step_logits, bf16_tolerance(hf_step_logits))
    assert ours[:agree] == hf_tokens[:agree], f"tokens differ before transformers' first near-tie at {agree}"
    sequence = prompt + hf_tokens
    reference = hf_logits(hf_model, sequence)
    assert (llm.score(sequence) - reference).abs().max().item() <= bf16_tolerance(reference)


def assert_fp32_matches(llm, hf_model, score_ids: list[int], prompts: list[list[int]], n: int = 32) -> None:
    """float32: logits within 1e-4 of transformers' at every position, and identical greedy tokens."""
    from moeserve import SamplingParams

    ours = llm.score(score_ids)
    assert ours.dtype == torch.float32 and ours.shape == (len(score_ids), hf_model.config.vocab_size)
    assert (ours - hf_logits(hf_model, score_ids)).abs().max().item() <= 1e-4
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf_model, prompt, n)[0]


def assert_bf16_matches(llm, hf_model, score_ids: list[int], prompts: list[list[int]], n: int = 32) -> None:
    """bfloat16: logits within the bf16 tolerance, and each prompt's generation held to the bf16 rule."""
    assert llm.config.dtype == torch.bfloat16
    reference = hf_logits(hf_model, score_ids)
    assert (llm.score(score_ids) - reference).abs().max().item() <= bf16_tolerance(reference)
    for prompt in prompts:
        assert_bf16_generation_matches(llm, hf_model, prompt, n)
