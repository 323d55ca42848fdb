"""The task suite: deterministic from its seed, splits disjoint by construction, answers right."""

from __future__ import annotations

import random

import pytest

from moeserve.errors import MoeServeError
from moeserve.eval.facts import fact_table
from moeserve.eval.tasks import EVAL_SIZE, SKILLS, split_items, split_size, train_stream


def _train_sample(n: int, seed: int = 0):
    stream = train_stream(random.Random(seed), {name: 1.0 for name in SKILLS})
    return [next(stream) for _ in range(n)]


def test_same_seed_same_items():
    assert split_items("test") == split_items("test")
    assert split_items("validation", seed=7) == split_items("validation", seed=7)
    assert _train_sample(500, seed=3) == _train_sample(500, seed=3)


def test_other_seed_other_items():
    assert split_items("test", seed=0) != split_items("test", seed=1)
    assert _train_sample(200, seed=0) != _train_sample(200, seed=1)


def test_eval_splits_have_distinct_items_of_every_skill():
    for split in ("validation", "test"):
        items = split_items(split)
        for name in SKILLS:
            keys = [i.key for i in items if i.skill == name]
            assert len(keys) == split_size(split) and len(set(keys)) == len(keys)
    assert split_size("test") == EVAL_SIZE == 200


def test_limit_takes_a_prefix():
    # The CI subset of the default model is "the first N test items per skill".
    full = split_items("test")
    small = split_items("test", per_task=10)
    for name in SKILLS:
        assert [i for i in small if i.skill == name] == [i for i in full if i.skill == name][:10]


@pytest.mark.parametrize("seed", [0, 1])
def test_splits_never_overlap(seed):
    keys = {split: {(i.skill, i.key) for i in split_items(split, seed=seed)} for split in ("validation", "test")}
    train = {(i.skill, i.key) for i in _train_sample(20_000, seed)}
    assert not keys["validation"] & keys["test"]
    assert not train & keys["test"]
    assert not train & keys["validation"]
    for split, split_keys in keys.items():
        assert all(SKILLS[skill].split_of(key) == split for skill, key in split_keys)


def test_every_fact_is_trained_and_held_out_in_another_phrasing():
    facts = fact_table()
    assert len(facts) >= 256
    assert len({f.value for f in facts}) == len(facts)  # no answer is shared
    split_of = SKILLS["facts"].split_of
    for index in range(len(facts)):
        splits = [split_of(f"{index}:{phrasing}") for phrasing in range(5)]
        assert sorted(splits) == ["test", "train", "train", "train", "validation"]


def test_answers_are_right():
    for item in split_items("test", per_task=50):
        if item.skill in ("add", "sub", "mul"):
            assert str(eval(item.key)) == item.answer  # keys are "a+b", "a-b", "a*b"
        elif item.skill == "sort":
            order, numbers = item.key.split(":")
            xs = sorted(map(int, numbers.split(",")), reverse=order == "desc")
            assert item.answer == ", ".join(map(str, xs))
        elif item.skill == "reverse":
            assert item.answer == item.key[::-1] and f"'{item.key}'" in item.prompt
        elif item.skill == "facts":
            fact = fact_table()[int(item.key.split(":")[0])]
            assert fact.country in item.prompt and item.answer == fact.value
        else:
            assert item.answer.isdigit() and int(item.answer) >= 0


def test_unknown_names_are_one_sentence_errors():
    with pytest.raises(MoeServeError, match="Unknown task 'poetry'"):
        split_items("test", ["add", "poetry"])
    with pytest.raises(MoeServeError, match="Unknown split 'dev'"):
        split_items("dev")
