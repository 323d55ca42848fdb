"""Exact-match accuracy of a model on the task suite, per skill and on average.

In: anything with `chat(conversations, SamplingParams) -> outputs with .text` (the engine's `LLM`,
or `ReferenceRunner` during training). Out: an `EvalReport`. Decoding is greedy; an answer is right
when the generated text, stripped of surrounding whitespace, equals the expected answer exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from moeserve import SamplingParams
from moeserve.eval.tasks import Item, split_items, split_size

CHUNK = 64  # conversations handed to the engine at once
MAX_TOKENS = 32  # longest expected answer (6 sorted numbers) is 23 tokens with its eos


@dataclass
class TaskScore:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class EvalReport:
    split: str
    per_task: dict[str, TaskScore]
    # Up to 3 wrong answers per task as (prompt, expected, got): enough to see how a model fails.
    mistakes: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    # Right / wrong per item, in item order: lets two models be compared item by item (paired).
    outcomes: dict[str, list[bool]] = field(default_factory=dict)

    @property
    def average(self) -> float:
        """Mean of the per-task accuracies (every skill weighs the same)."""
        return sum(s.accuracy for s in self.per_task.values()) / len(self.per_task) if self.per_task else 0.0

    def format_table(self) -> str:
        lines = [f"{'task':<10} {'correct':>8} {'total':>6} {'accuracy':>9}"]
        for name, s in self.per_task.items():
            lines.append(f"{name:<10} {s.correct:>8} {s.total:>6} {100 * s.accuracy:>8.1f}%")
        lines.append(f"{'average':<10} {'':>8} {'':>6} {100 * self.average:>8.1f}%")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "average": self.average,
            "per_task": {n: {"correct": s.correct, "total": s.total, "accuracy": s.accuracy}
                         for n, s in self.per_task.items()},
            "mistakes": {n: [list(m) for m in ms] for n, ms in self.mistakes.items()},
        }


def score(split: str, items: list[Item], predictions: list[str]) -> EvalReport:
    report = EvalReport(split, {})
    for item, got in zip(items, predictions, strict=True):
        task = report.per_task.setdefault(item.skill, TaskScore(0, 0))
        task.total += 1
        report.outcomes.setdefault(item.skill, []).append(got.strip() == item.answer)
        if got.strip() == item.answer:
            task.correct += 1
        elif len(report.mistakes.setdefault(item.skill, [])) < 3:
            report.mistakes[item.skill].append((item.prompt, item.answer, got.strip()))
    return report


def evaluate(llm, split: str = "test", tasks: list[str] | None = None, limit: int | None = None,
             progress: bool = False, experts=None) -> EvalReport:
    """Accuracy on the first `limit` items of each task of `split` (default and most: all of them).
    `experts`: an expert provider to run the `LLM` on instead of its own (moeserve bench / tune)."""
    size = split_size(split)
    items = split_items(split, tasks, per_task=size if limit is None else max(1, min(limit, size)))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    predictions: list[str] = []
    for start in tqdm(range(0, len(items), CHUNK), disable=not progress, desc=f"eval {split}", unit="chunk"):
        chunk = items[start:start + CHUNK]
        conversations = [[{"role": "user", "content": it.prompt}] for it in chunk]
        outputs = llm.chat(conversations, params) if experts is None else llm.chat(conversations, params, experts=experts)
        predictions.extend(out.text for out in outputs)
    return score(split, items, predictions)
