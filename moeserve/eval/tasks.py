"""The task suite: seven skills whose every item is a prompt with one exact expected answer.

Items flow out of here into training (`train_stream`) and evaluation (`split_items`); nothing here
knows about models or tokenizers. Everything is generated from a seed with `random.Random`, so the
same seed gives the same items on every machine.

Splits never overlap by construction. Each item has a canonical `key` (the problem itself, not its
wording: "1234+5678" whatever phrasing asks it) and the key alone decides the split, through a hash
for the open-ended skills and through a per-fact assignment of phrasings for `facts` (whose facts
must all be seen in training; there a split is a held-out phrasing of a memorised fact).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from moeserve.errors import MoeServeError
from moeserve.eval.facts import NUM_COUNTRIES, RELATIONS, fact_table

SUITE_SEED = 0
SPLITS = ("train", "validation", "test")
EVAL_SIZE = 200  # items per skill in the test split
VAL_SIZE = 50  # items per skill in the validation split (watched during training)
# Operand sizes: 3 digits, so "What is 123 + 456?" is in range. Subtraction at 2 digits was worse,
# not better (50% on test after a full run): its ~4.5k training problems were memorised instead of
# generalised, while 3-digit addition (~450k problems, too many to memorise) reached 99.5%.
ADD_MAX_DIGITS = 3
SUB_MAX_DIGITS = 3
# Multiplication by one digit had the same problem: with two-digit multiplicands only (720 problems,
# 432 of them for training) test accuracy stalled at 52-61%. Three-digit ones bring it to 7920.
MUL_MAX_DIGITS = 3


@dataclass(frozen=True)
class Item:
    skill: str
    key: str  # canonical problem; decides the split
    prompt: str
    answer: str


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    phrasings: tuple[str, ...]  # the templates; documented in the model card
    sample: Callable[[random.Random], Item]
    split_of: Callable[[str], str]  # key -> split


def _hash_split(skill: str, key: str, test_share: float = 0.05, val_share: float = 0.05) -> str:
    digest = hashlib.sha256(f"{skill}|{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_share:
        return "test"
    if u < test_share + val_share:
        return "validation"
    return "train"


def _operand(rng: random.Random, max_digits: int) -> int:
    # The digit count is drawn first so short and long numbers are equally common.
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


# --- arithmetic ---------------------------------------------------------------------------------

ADD_PHRASINGS = ("What is {a} + {b}?", "Calculate {a} + {b}.", "What is the sum of {a} and {b}?",
                 "Add {a} and {b}.", "{a} + {b} = ?")
SUB_PHRASINGS = ("What is {a} - {b}?", "Calculate {a} - {b}.", "What is {a} minus {b}?",
                 "Subtract {b} from {a}.", "{a} - {b} = ?")
MUL_PHRASINGS = ("What is {a} * {b}?", "Calculate {a} * {b}.", "What is {a} times {b}?",
                 "Multiply {a} by {b}.", "What is the product of {a} and {b}?")


def _sample_add(rng: random.Random) -> Item:
    a, b = _operand(rng, ADD_MAX_DIGITS), _operand(rng, ADD_MAX_DIGITS)
    prompt = rng.choice(ADD_PHRASINGS).format(a=a, b=b)
    return Item("add", f"{a}+{b}", prompt, str(a + b))


def _sample_sub(rng: random.Random) -> Item:
    a, b = _operand(rng, SUB_MAX_DIGITS), _operand(rng, SUB_MAX_DIGITS)
    a, b = max(a, b), min(a, b)  # results stay non-negative
    prompt = rng.choice(SUB_PHRASINGS).format(a=a, b=b)
    return Item("sub", f"{a}-{b}", prompt, str(a - b))


def _sample_mul(rng: random.Random) -> Item:
    digits = rng.randint(2, MUL_MAX_DIGITS)  # two- and three-digit multiplicands equally often
    a, b = rng.randint(10 ** (digits - 1), 10**digits - 1), rng.randint(2, 9)
    prompt = rng.choice(MUL_PHRASINGS).format(a=a, b=b)
    return Item("mul", f"{a}*{b}", prompt, str(a * b))


# --- lists and strings --------------------------------------------------------------------------

SORT_ASC_PHRASINGS = ("Sort these numbers: {xs}", "Sort in ascending order: {xs}",
                      "Put these numbers in order from smallest to largest: {xs}")
SORT_DESC_PHRASINGS = ("Sort in descending order: {xs}", "Order from largest to smallest: {xs}")
REVERSE_PHRASINGS = ("Reverse the word '{w}'.", "Spell '{w}' backwards.", "Write '{w}' in reverse.",
                     "What is '{w}' reversed?")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _sample_sort(rng: random.Random) -> Item:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 7))]
    descending = rng.random() < 0.3
    phrasings = SORT_DESC_PHRASINGS if descending else SORT_ASC_PHRASINGS
    prompt = rng.choice(phrasings).format(xs=", ".join(map(str, xs)))
    answer = ", ".join(map(str, sorted(xs, reverse=descending)))
    return Item("sort", f"{'desc' if descending else 'asc'}:{','.join(map(str, xs))}", prompt, answer)


def _sample_reverse(rng: random.Random) -> Item:
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 7)))
    prompt = rng.choice(REVERSE_PHRASINGS).format(w=word)
    return Item("reverse", word, prompt, word[::-1])


# --- facts --------------------------------------------------------------------------------------

FACT_PHRASINGS = {
    "capital": ("What is the capital of {c}?", "Which city is the capital of {c}?",
                "Name the capital city of {c}.", "What city serves as the capital of {c}?",
                "{c} has its capital in which city?"),
    "language": ("What language is spoken in {c}?", "Which language do people speak in {c}?",
                 "Name the main language of {c}.", "What is the official language of {c}?",
                 "In {c}, which language is spoken?"),
}


def _fact_phrasing_splits(fact_index: int) -> dict[int, str]:
    # Each fact gets its own random order of its 5 phrasings: 1 for test, 1 for validation, 3 for
    # training. Every phrasing is trained on (for other facts) and every fact is memorised.
    order = list(range(5))
    random.Random(f"fact-phrasings|{fact_index}").shuffle(order)
    return {order[0]: "test", order[1]: "validation", **{p: "train" for p in order[2:]}}


def _sample_fact(rng: random.Random) -> Item:
    facts = fact_table()
    index = rng.randrange(len(facts))
    fact = facts[index]
    phrasing = rng.randrange(5)
    prompt = FACT_PHRASINGS[fact.relation][phrasing].format(c=fact.country)
    return Item("facts", f"{index}:{phrasing}", prompt, fact.value)


def _fact_split(key: str) -> str:
    index, phrasing = map(int, key.split(":"))
    return _fact_phrasing_splits(index)[phrasing]


# --- two-step word problems ---------------------------------------------------------------------

_PEOPLE = (("Anna", "She"), ("Ben", "He"), ("Carla", "She"), ("David", "He"), ("Emma", "She"),
           ("Felix", "He"), ("Grace", "She"), ("Hugo", "He"), ("Iris", "She"), ("Jack", "He"),
           ("Lena", "She"), ("Max", "He"), ("Nora", "She"), ("Omar", "He"), ("Paula", "She"),
           ("Sam", "He"))
_THINGS = ("apples", "marbles", "cards", "books", "coins", "pens", "stickers", "shells", "stamps",
           "cookies")

# Each story is (template, answer from (a, b, c), sampler of (a, b, c)): two operations on small
# numbers, so the skill is reading the story right more than doing long arithmetic.
_STORIES: tuple[tuple[str, Callable[[int, int, int], int], Callable[[random.Random], tuple]], ...] = (
    ("{n} has {a} {t}. {p} buys {b} more and then gives {c} to {m}. How many {t} does {n} have now?",
     lambda a, b, c: a + b - c,
     lambda r: (lambda a, b: (a, b, r.randint(1, min(9, a + b))))(r.randint(2, 30), r.randint(1, 9))),
    ("{n} had {a} {t}, gave away {b}, and then found {c} more. How many {t} does {n} have?",
     lambda a, b, c: a - b + c,
     lambda r: (lambda a: (a, r.randint(1, min(9, a)), r.randint(1, 9)))(r.randint(2, 30))),
    ("A box holds {a} {t}. {n} adds {b} bags of {c} {t} each. How many {t} are in the box now?",
     lambda a, b, c: a + b * c,
     lambda r: (r.randint(2, 30), r.randint(2, 5), r.randint(2, 5))),
    ("{n} buys {a} packs of {b} {t} and gives {c} of them to {m}. How many {t} does {n} keep?",
     lambda a, b, c: a * b - c,
     lambda r: (lambda a, b: (a, b, r.randint(1, min(9, a * b))))(r.randint(2, 5), r.randint(2, 5))),
    ("{n} has {a} {t}. {m} has {b} more {t} than {n}. How many {t} do they have together?",
     lambda a, b, c: a + (a + b),
     lambda r: (r.randint(2, 30), r.randint(1, 9), 0)),
)


def _sample_word(rng: random.Random) -> Item:
    story = rng.randrange(len(_STORIES))
    template, solve, draw = _STORIES[story]
    a, b, c = draw(rng)
    (name, pronoun), (other, _) = rng.sample(_PEOPLE, 2)
    prompt = template.format(n=name, p=pronoun, m=other, t=rng.choice(_THINGS), a=a, b=b, c=c)
    return Item("word", f"{story}:{a},{b},{c}", prompt, str(solve(a, b, c)))


# --- the registry -------------------------------------------------------------------------------

SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add", f"addition of two numbers of 1 to {ADD_MAX_DIGITS} digits", ADD_PHRASINGS, _sample_add,
              lambda k: _hash_split("add", k)),
        Skill("sub", f"subtraction of two numbers of 1 to {SUB_MAX_DIGITS} digits, result >= 0", SUB_PHRASINGS,
              _sample_sub, lambda k: _hash_split("sub", k)),
        Skill("mul", f"a 2- to {MUL_MAX_DIGITS}-digit number times a 1-digit number (2 to 9)", MUL_PHRASINGS,
              _sample_mul, lambda k: _hash_split("mul", k)),
        Skill("sort", "sort 3 to 7 one-digit numbers, ascending (70%) or descending (30%)",
              SORT_ASC_PHRASINGS + SORT_DESC_PHRASINGS, _sample_sort, lambda k: _hash_split("sort", k)),
        Skill("reverse", "reverse a random lowercase string of 3 to 7 letters", REVERSE_PHRASINGS,
              _sample_reverse, lambda k: _hash_split("reverse", k)),
        Skill("facts", f"recall the capital or language of one of {NUM_COUNTRIES} invented countries "
              f"({len(RELATIONS) * NUM_COUNTRIES} facts)",
              FACT_PHRASINGS["capital"] + FACT_PHRASINGS["language"], _sample_fact, _fact_split),
        Skill("word", "two-step word problem with numbers up to 30", tuple(s[0] for s in _STORIES),
              _sample_word, lambda k: _hash_split("word", k)),
    )
}


def resolve_tasks(tasks: list[str] | None) -> list[str]:
    """Skill names in suite order; `None` means all of them."""
    if tasks is None:
        return list(SKILLS)
    unknown = [t for t in tasks if t not in SKILLS]
    if unknown:
        raise MoeServeError(f"Unknown task {unknown[0]!r}; choose from {', '.join(SKILLS)}.")
    return [t for t in SKILLS if t in tasks]


def split_size(split: str) -> int:
    """Items per skill in an evaluation split."""
    return VAL_SIZE if split == "validation" else EVAL_SIZE


def split_items(split: str = "test", tasks: list[str] | None = None, seed: int = SUITE_SEED,
                per_task: int | None = None) -> list[Item]:
    """`per_task` distinct items of each skill that belong to `split` (default: the split's size)."""
    if split not in SPLITS:
        raise MoeServeError(f"Unknown split {split!r}; choose from {', '.join(SPLITS)}.")
    if per_task is None:
        per_task = split_size(split)
    items = []
    for name in resolve_tasks(tasks):
        skill = SKILLS[name]
        rng = random.Random(f"{seed}|{split}|{name}")
        seen: set[str] = set()
        for _ in range(1000 * per_task):
            if len(seen) == per_task:
                break
            item = skill.sample(rng)
            if item.key not in seen and skill.split_of(item.key) == split:
                seen.add(item.key)
                items.append(item)
        if len(seen) < per_task:
            raise MoeServeError(f"The {split} split of {name!r} has fewer than {per_task} items; ask for fewer.")
    return items


def train_stream(rng: random.Random, weights: dict[str, float]) -> Iterator[Item]:
    """Endless training items: a skill drawn by `weights`, then an item of it outside val/test."""
    names = list(weights)
    probs = [weights[n] for n in names]
    while True:
        skill = SKILLS[rng.choices(names, probs)[0]]
        item = skill.sample(rng)
        if skill.split_of(item.key) == "train":
            yield item
