"""Measure a trained default-model directory and write its model card.

    python -m moeserve.eval.model_card DIR [--runner engine|reference]

In: DIR as written by train_default (checkpoint + training.json). Out: DIR/eval_results.json
(test-split report, the CI subset's report, expert usage) and DIR/README.md built from it, so
every figure in the card is measured, never typed in. tests/test_default_model.py compares the
shipped model against the subset figure recorded here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moeserve import LLM, SamplingParams
from moeserve.eval.evaluate import MAX_TOKENS, evaluate
from moeserve.eval.expert_usage import expert_shares
from moeserve.eval.facts import fact_table
from moeserve.eval.reference import ReferenceRunner
from moeserve.eval.tasks import EVAL_SIZE, SKILLS, split_items

CI_SUBSET = 10  # test items per task in the fast CI check (the first ones of the test split)


def demos() -> list[tuple[str, str]]:
    """(prompt, expected answer): one natural question per skill, shown in the card with the answer
    the shipped model gives (`moeserve generate --chat PROMPT`)."""
    fact = fact_table()[0]
    return [
        ("What is 123 + 456?", "579"),
        ("What is 85 - 37?", "48"),
        ("What is 23 * 7?", "161"),
        ("Sort these numbers: 5, 2, 9", "2, 5, 9"),
        ("Reverse the word 'planet'.", "tenalp"),
        (f"What is the {fact.relation} of {fact.country}?", fact.value),
        ("Anna has 12 apples. She buys 5 more and then gives 3 to Ben. How many apples does Anna have now?", "14"),
    ]


def measure(model_dir: Path, runner_kind: str) -> dict:
    reference = ReferenceRunner.from_dir(model_dir)
    runner = LLM(model=model_dir) if runner_kind == "engine" else reference
    full = evaluate(runner, split="test", progress=True)
    subset = evaluate(runner, split="test", limit=CI_SUBSET)
    usage = expert_shares(reference.model, reference.tokenizer, split_items("test"))
    outputs = runner.chat([[{"role": "user", "content": p}] for p, _ in demos()],
                          SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    shown = [{"prompt": p, "expected": e, "answer": o.text.strip()} for (p, e), o in zip(demos(), outputs)]
    return {"runner": runner_kind, "test": full.to_dict(), "ci_subset": {"per_task": CI_SUBSET, **subset.to_dict()},
            "expert_shares": usage, "demos": shown}


def _params(config: dict) -> dict[str, int]:
    d, i, e, layers = (config["hidden_size"], config["moe_intermediate_size"], config["num_experts"],
                       config["num_hidden_layers"])
    hd, h, kv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    attention = d * hd * (2 * h + 2 * kv) + 2 * hd
    experts = 3 * d * i * e
    per_layer = attention + experts + d * e + 2 * d
    total = layers * per_layer + 2 * config["vocab_size"] * d + d
    active = total - layers * 3 * d * i * (e - config["num_experts_per_tok"])
    return {"total": total, "experts": layers * experts, "active": active}


def _report_table(report: dict) -> list[str]:
    lines = ["| skill | correct | total | exact match |", "|---|---:|---:|---:|"]
    for name, s in report["per_task"].items():
        lines.append(f"| {name} | {s['correct']} | {s['total']} | {100 * s['accuracy']:.1f}% |")
    lines.append(f"| **average** | | | **{100 * report['average']:.1f}%** |")
    return lines


def _usage_table(shares: list[list[float]]) -> list[str]:
    experts = len(shares[0])
    lines = ["| layer | " + " | ".join(f"e{e}" for e in range(experts)) + " | max |",
             "|---|" + "---:|" * (experts + 1)]
    for layer, row in enumerate(shares):
        lines.append(f"| {layer} | " + " | ".join(f"{100 * s:.1f}" for s in row) + f" | **{100 * max(row):.1f}** |")
    return lines


def write_card(model_dir: Path, results: dict) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    training = json.loads((model_dir / "training.json").read_text())
    params = _params(config)
    size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    runner = ("the moeserve engine (`moeserve eval`, greedy)" if results["runner"] == "engine"
              else "the fp32 reference decoder `moeserve.eval.reference` (greedy)")
    lines = [
        "# moeserve default model",
        "",
        "A small mixture-of-experts language model trained from scratch on moeserve's task suite "
        "(`moeserve/eval/tasks.py`). It ships inside the package so `LLM()` and every CLI command "
        "work without a download, and so accuracy versus expert-compression error can be measured "
        "exactly: every question has one exact answer.",
        "",
        "## Architecture",
        "",
        f"Qwen3-MoE layout (`model_type: qwen3_moe`, HF checkpoint names, loads in "
        f"`transformers.Qwen3MoeForCausalLM`), weights stored in bfloat16 ({size_mb:.1f} MB) and computed "
        f"in {config['dtype']} (the config's dtype, what `LLM()` loads them as).",
        "",
        "| | |",
        "|---|---|",
        f"| layers | {config['num_hidden_layers']} (every layer is sparse) |",
        f"| hidden size | {config['hidden_size']} |",
        f"| attention | {config['num_attention_heads']} query heads, {config['num_key_value_heads']} key/value "
        f"heads, head dim {config['head_dim']}, q/k RMSNorm, RoPE theta {config['rope_theta']:g} |",
        f"| experts per layer | {config['num_experts']}, top-{config['num_experts_per_tok']}, renormalised "
        f"(`norm_topk_prob`), SwiGLU, intermediate size {config['moe_intermediate_size']} |",
        f"| vocabulary | {config['vocab_size']} (byte-level BPE) |",
        f"| context | {config['max_position_embeddings']} tokens |",
        f"| parameters | {params['total']:,} total; {params['experts']:,} in experts "
        f"({100 * params['experts'] / params['total']:.0f}%); {params['active']:,} active per token |",
        "",
        "Why this shape: 8 layers make shallow / middle / deep layer groups meaningful for the "
        "compression benchmarks; the experts hold most of the weights, since they are what moeserve "
        "compresses; hidden size 128 and expert width 128 keep the compute per token small enough "
        "that a training run fits in an hour on 2 CPU cores. Weights are stored in bf16, like real MoE "
        "checkpoints; the measurements below are taken from the stored bf16 weights, computed in float32 "
        "(on a CPU faster than bf16, and the answers do not depend on which requests share a batch).",
        "",
        "## Tokenizer and chat format",
        "",
        "Byte-level BPE trained with the `tokenizers` library on the training split. Digits are single "
        "tokens; a lowercase word in quotes or at the end of a message is split into letters (so a "
        "string and its reversal are both letter sequences); capitalised words stay whole for BPE.",
        "A turn is `<|role|>content<|end|>` (roles system, user, assistant); the prompt ends with "
        "`<|assistant|>` and the model ends its answer with `<|end|>`, the eos token. There is no BOS.",
        "",
        "## Skills and phrasings",
        "",
        "Answers are exact strings: a number, a comma-separated list (`2, 5, 9`), a reversed string or "
        "a name. Each skill is asked in several phrasings, chosen at random per item:",
        "",
    ]
    examples = {item.skill: item for item in reversed(split_items("test", per_task=1))}
    for name, skill in SKILLS.items():
        lines.append(f"- **{name}**: {skill.description}. Example: \"{examples[name].prompt}\" -> "
                     f"`{examples[name].answer}`.")
        lines.extend(f"  - `{p}`" for p in skill.phrasings)
    lines += [
        "",
        "Difficulty was sized with single-skill pilots so that one CPU hour can teach every skill: "
        "reversing and sorting one-digit lists are learned from about 10k examples, the facts from "
        "about 20k, while arithmetic and the word problems need several times more (three-digit "
        "addition was still near 0% after 20k examples). Addition keeps three-digit operands so the "
        "documented `What is 123 + 456?` is in range, and so does subtraction: with two-digit operands "
        "its few thousand training problems were memorised rather than generalised (50% on test). "
        "Multiplication by one digit takes two- and three-digit multiplicands for the same reason: "
        "two-digit ones alone give 720 problems, which stalled at 52-61% on test.",
        "",
        "Splits: the canonical problem (e.g. `12+57`, whatever the phrasing) is hashed into "
        f"test (5%), validation (5%) or training (90%), so a test problem is never trained on in any "
        f"phrasing. Facts are different: all {len(fact_table())} facts "
        "must be seen in training, so for each fact one of its five phrasings is held out for test and "
        "one for validation (every phrasing is still trained on, for other facts). The test split of "
        "facts therefore measures recall of a memorised fact through a phrasing not seen with that fact.",
        "",
        "## Training",
        "",
        "```",
        training["command"],
        "```",
        "",
        f"{training['steps']} steps, {training['examples']:,} examples ({training['tokens']:,} tokens, "
        f"packed {training['rows']} rows x {training['row_len']} tokens per step), AdamW lr "
        f"{training['lr']:g} (warm-up {training['warmup']} steps, constant, cosine decay over the last "
        f"{100 * training['decay_frac']:.0f}%), weight decay {training['weight_decay']:g}, load-balancing loss coefficient "
        f"{training['aux_coef']:g}, seed {training['seed']}. Loss on answer tokens only. "
        f"Wall time {training['wall_time_s'] / 60:.1f} min on {training['hardware']}; the process used "
        f"{training['cpu_time_s'] / 60:.1f} CPU-minutes, i.e. {training['cpu_time_s'] / training['wall_time_s']:.2f} "
        f"cores on average. "
        f"Training mixture (relative weights): {training['mixture']}."
        + (f" Then {training['final_steps']} more steps at the final lr "
           f"({training['lr'] * training['min_lr_ratio']:g}) with the mixture {training['final_mixture']}; "
           f"the example and token counts above include them." if training.get("final_steps") else ""),
        "",
        f"## Accuracy on the test split ({EVAL_SIZE} items per skill)",
        "",
        f"Measured with {runner} from the shipped weights:",
        "",
        *_report_table(results["test"]),
        "",
        f"CI check (`tests/test_default_model.py`): the first {CI_SUBSET} test items per skill give "
        f"{100 * results['ci_subset']['average']:.1f}% on average (recorded in `eval_results.json`).",
        "",
        "## Try it",
        "",
        "Answers of the shipped model (greedy) to one natural question per skill:",
        "",
        "| `moeserve generate --chat` | answer | expected |",
        "|---|---|---|",
        *[f"| `{d['prompt']}` | `{d['answer']}` | `{d['expected']}` |" for d in results["demos"]],
        "",
        "## Expert usage",
        "",
        "Share (%) of routed token slots per expert on the test split (prompt, answer and eos tokens, "
        "top-2, so each token fills two slots):",
        "",
        *_usage_table(results["expert_shares"]),
        "",
        "## Limitations",
        "",
        "It knows only the suite's skills and phrasings close to them; anything else gets an answer "
        "of the same shape, not a sensible one. The countries are invented.",
        "",
    ]
    text = "\n".join(lines)
    (model_dir / "README.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a default-model directory and write its model card.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--runner", choices=("engine", "reference"), default="engine")
    args = parser.parse_args(argv)
    results = measure(args.model_dir, args.runner)
    (args.model_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"test average {100 * results['test']['average']:.1f}%:",
          {n: round(100 * s["accuracy"], 1) for n, s in results["test"]["per_task"].items()})
    write_card(args.model_dir, results)


if __name__ == "__main__":
    main()
