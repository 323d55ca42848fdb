"""Train the default model's byte-level BPE tokenizer on the task suite and write it HF-style.

In: the training stream of the task suite. Out: tokenizer.json (a `tokenizers` BPE) and
tokenizer_config.json (chat template, eos and pad tokens) in a model directory.

Pre-tokenization is chosen so that the skills are learnable by a small model:
- digits are single tokens, so numbers are spelled digit by digit (carry and place value are
  visible to the model);
- a lowercase word in quotes, or a lowercase word that ends a message, is split into single
  letters, so "Reverse the word 'planet'." and its answer "tenalp" are reversible token by token;
- a capitalised word is kept whole for BPE (names of countries and capitals stay compact).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from moeserve.eval.chat_format import CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, render_chat
from moeserve.eval.tasks import SKILLS, train_stream

VOCAB_SIZE = 768  # 256 byte symbols + 5 specials + ~500 merges of template words and names
CORPUS_SIZE = 40_000  # rendered training conversations the merges are learned from
_LETTER_SPLIT = r"[A-Z][a-z]*|[a-z](?=[a-z]*(?:'|$))"


def build_tokenizer(seed: int = 0) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LETTER_SPLIT), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any input text stays encodable
        show_progress=False,
    )
    stream = train_stream(random.Random(f"tokenizer|{seed}"), {name: 1.0 for name in SKILLS})
    corpus = (
        render_chat([{"role": "user", "content": item.prompt},
                     {"role": "assistant", "content": item.answer}], add_generation_prompt=False)
        for item, _ in zip(stream, range(CORPUS_SIZE))
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, model_dir: Path, max_length: int) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
