"""lm-eval, the real outside client, against `moeserve serve` on the embedded model, with no tokenizer
on the client: `--model local-completions` with `tokenizer_backend=remote` reads the server's
/tokenizer_info, /tokenize and /detokenize.

Two tasks, written here as a local task directory over local JSON files (nothing is downloaded):
a `generate_until` task on fresh arithmetic (test-split problems, never trained on) in the model's
chat format, and a multiple-choice task scored by loglikelihood. Each score is checked against the
same items run through moeserve's Python API (greedy answers; summed continuation log-probabilities),
and against the model card: add/sub/mul score 92.0-97.5% on the test split, so 30 items must score
at least 80% (the card's lowest less more than two standard errors of 30 items).

The exact command is documented in docs/server.md ("Evaluating with lm-eval").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from moeserve import LLM, SamplingParams  # noqa: E402
from moeserve.eval.tasks import split_items  # noqa: E402

PER_SKILL = 10  # 30 items per task
CHAT = "<|user|>{}<|end|><|assistant|>"
# The multiple-choice task's contexts open with one of the system prompts the model was trained with, a
# shared preamble as few-shot examples are: its full KV blocks are computed once and then found in the
# prefix cache by every later request.
SYSTEM = "<|system|>You are a careful calculator.<|end|>"

GENERATE_TASK = """task: moeserve_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "<|user|>{{{{question}}}}<|end|><|assistant|>"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["<|end|>"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""

CHOICE_TASK = """task: moeserve_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "<|system|>You are a careful calculator.<|end|><|user|>{{{{question}}}}<|end|><|assistant|>"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""

# Runs lm-eval's command line in a fresh interpreter in which loading a client-side tokenizer fails.
RUN_LM_EVAL = """
import sys
import transformers
def refuse(*args, **kwargs):
    raise AssertionError("lm-eval tried to load a tokenizer on the client")
transformers.AutoTokenizer.from_pretrained = refuse
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval"] + sys.argv[1:]
cli_evaluate()
"""


def arithmetic_items():
    items = split_items("test", ["add", "sub", "mul"], per_task=PER_SKILL)
    choices = []
    for item in items:
        answer = int(item.answer)
        wrong = [answer + 1, answer + 10, answer - 1 if answer > 0 else answer + 2]
        choices.append([f"{answer}<|end|>", *(f"{w}<|end|>" for w in wrong)])
    return items, choices


def write_tasks(directory: Path) -> None:
    items, choices = arithmetic_items()
    generate, choice = directory / "arith.jsonl", directory / "choice.jsonl"
    generate.write_text("".join(json.dumps({"question": i.prompt, "answer": i.answer}) + "\n" for i in items))
    choice.write_text(
        "".join(json.dumps({"question": i.prompt, "choices": c, "label": 0}) + "\n" for i, c in zip(items, choices))
    )
    (directory / "moeserve_arith.yaml").write_text(GENERATE_TASK.format(data=generate))
    (directory / "moeserve_choice.yaml").write_text(CHOICE_TASK.format(data=choice))


def reference_scores() -> tuple[float, float]:
    """The same items through the Python API: greedy chat answers, and the choice whose tokens have
    the highest summed log-probability after the prompt."""
    llm = LLM(None, device="cpu")
    items, choices = arithmetic_items()
    outs = llm.chat([[{"role": "user", "content": i.prompt}] for i in items], SamplingParams(max_tokens=16, temperature=0))
    generated = sum(o.text == i.answer for o, i in zip(outs, items)) / len(items)
    wholes, starts = [], []
    for item, options in zip(items, choices):
        context = llm.tokenizer.encode(SYSTEM + CHAT.format(item.prompt), add_special_tokens=False)
        for option in options:
            wholes.append(llm.tokenizer.encode(SYSTEM + CHAT.format(item.prompt) + option, add_special_tokens=False))
            starts.append(len(context))
    # One engine pass over every prompt; prompt_logprobs=0: each prompt token's own log-probability.
    scored = llm.generate(wholes, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    totals = [
        sum(out.prompt_logprobs[t][whole[t]] for t in range(start, len(whole)))
        for out, whole, start in zip(scored, wholes, starts)
    ]
    per_item = len(choices[0])
    right = sum(
        max(range(per_item), key=lambda k: totals[i * per_item + k]) == 0 for i in range(len(items))
    )
    return generated, right / len(items)


def prefix_cache_hits(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics") as response:
        text = response.read().decode()
    return float(re.search(r"^moeserve:prefix_cache_hits_total\{[^}]*\} (\S+)$", text, re.M).group(1))


def test_lm_eval_local_completions_with_remote_tokenizer(default_server, tmp_path):
    write_tasks(tmp_path)
    model_args = (
        f"base_url={default_server.url}/v1/completions,model=moeserve-default,"
        f"tokenizer_backend=remote,max_length=256"
    )
    command = [
        sys.executable, "-c", RUN_LM_EVAL,
        "--model", "local-completions", "--model_args", model_args,
        "--include_path", str(tmp_path), "--batch_size", "16", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    # both tasks in one lm-eval process: its start-up (lm-eval, datasets, transformers) costs ~20 s a run here
    before = prefix_cache_hits(default_server.url)
    run = subprocess.run(command + ["--tasks", "moeserve_arith,moeserve_choice"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    hits = prefix_cache_hits(default_server.url) - before
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    generated = results["moeserve_arith"]["exact_match,none"]
    chosen = results["moeserve_choice"]["acc,none"]
    # the choices' shared system prompt (16 tokens and more) was computed once and then found in the cache (an
    # arithmetic prompt, shorter than one 16-token block, can find none)
    assert hits > 0, hits

    expected_generated, expected_chosen = reference_scores()
    assert generated == pytest.approx(expected_generated)
    assert chosen == pytest.approx(expected_chosen)
    assert generated >= 0.8 and chosen >= 0.8, (generated, chosen)
