"""Decode throughput of `LLM.generate` against transformers' `generate` on the same model, CPU.

Builds a random Qwen3-MoE checkpoint (8 layers, 16 experts, top-2, hidden 256 by default) with
transformers, then times greedy generation of both engines in one run, batch 1 and batch 8,
after a warm-up. Prints tokens/s and the ratio; the issue's target is >= 1.5x at batch 1.

    python bench/engine_vs_transformers.py [--layers 8 --experts 16 --hidden 256 --new-tokens 64 --threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def build_checkpoint(directory: str, layers: int, experts: int, hidden: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        num_experts=experts,
        num_experts_per_tok=2,
        moe_intermediate_size=hidden * 2,
        intermediate_size=hidden * 4,
        vocab_size=4096,
        max_position_embeddings=2048,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def best_times(fns: list, repeats: int) -> list[float]:
    """Best wall time of each function; runs are interleaved so that load from other processes
    on the machine hits every contender alike."""
    for fn in fns:
        fn()  # warm-up: first-call allocations and kernel selection are not throughput
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from moeserve import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as directory:
        build_checkpoint(directory, args.layers, args.experts, args.hidden)
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        llm = LLM(directory, device="cpu", dtype="float32")
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        generator = torch.Generator().manual_seed(1)
        print(f"model: qwen3_moe, {args.layers} layers, {args.experts} experts top-2, hidden {args.hidden}; "
              f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}")
        print(f"{'batch':>5} {'moeserve tok/s':>15} {'transformers tok/s':>19} {'ratio':>7}")
        for batch in (1, 8):
            prompts = torch.randint(0, 4096, (batch, args.prompt_tokens), generator=generator)

            def run_hf():
                with torch.no_grad():
                    hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

            def run_ours():
                llm.generate(prompts.tolist(), params)

            tokens = batch * args.new_tokens
            ours_s, theirs_s = best_times([run_ours, run_hf], args.repeats)
            ours, theirs = tokens / ours_s, tokens / theirs_s
            print(f"{batch:>5} {ours:>15.1f} {theirs:>19.1f} {ours / theirs:>6.2f}x")


if __name__ == "__main__":
    main()
