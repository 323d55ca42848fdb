"""The fixed table of synthetic facts that the default model memorises.

Every fact is (country, relation, value) about an invented country, so no pretrained knowledge can
help and the only place the model can hold the answer is its weights (mostly the experts). The
table is generated from FACTS_SEED alone: it is part of the model, not of an evaluation run, so
changing the suite's seed never changes the facts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

FACTS_SEED = 20240521
NUM_COUNTRIES = 128  # x 2 relations = 256 facts

# Syllables are built from letters that spell pronounceable names; BPE gives each name a few
# tokens, so recalling it means emitting several tokens in order.
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
           "tr", "st", "th", "sh", "gl", "pl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m"]
_COUNTRY_ENDINGS = ["ia", "and", "ora", "istan", "avia", "enia", "ar"]
_LANGUAGE_ENDINGS = ["ish", "ese", "ic", "ian", "i"]

RELATIONS = ("capital", "language")


@dataclass(frozen=True)
class Fact:
    country: str
    relation: str  # one of RELATIONS
    value: str


def _syllables(rng: random.Random, count: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(count))


@lru_cache(maxsize=1)
def fact_table() -> tuple[Fact, ...]:
    """All facts, country by country, in a fixed order (the same on every machine and run)."""
    rng = random.Random(FACTS_SEED)
    used: set[str] = set()

    def fresh(make) -> str:
        # Names are unique across countries, capitals and languages so no answer is ambiguous.
        while True:
            name = make().capitalize()
            if name not in used and 4 <= len(name) <= 12:
                used.add(name)
                return name

    facts = []
    for _ in range(NUM_COUNTRIES):
        country = fresh(lambda: _syllables(rng, rng.randint(1, 2)) + rng.choice(_COUNTRY_ENDINGS))
        capital = fresh(lambda: _syllables(rng, 2))
        language = fresh(lambda: _syllables(rng, 1) + rng.choice(_LANGUAGE_ENDINGS))
        facts.append(Fact(country, "capital", capital))
        facts.append(Fact(country, "language", language))
    return tuple(facts)
