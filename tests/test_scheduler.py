"""The scheduler on its own, in plain Python (no model, no tensors): admission under the token budget
and the sequence limit, prefill first, round-robin between expert providers, abort in every state."""

from __future__ import annotations

import itertools

import pytest

from moeserve import SamplingParams
from moeserve.engine.scheduler import Scheduler
from moeserve.engine.sequence import Sequence, SequenceStatus


class Provider:
    """Stands in for an expert provider: the scheduler only groups by it."""

    prediction_depth = 0

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


A, B = Provider("A"), Provider("B")
_ids = itertools.count()


def seq(prompt_len: int, experts=A) -> Sequence:
    s = Sequence(next(_ids), list(range(prompt_len)), SamplingParams(max_tokens=4), 64, None, None)
    s.experts = experts
    return s


def run(scheduler: Scheduler):
    """One step as the engine takes it: cache rows for newly admitted sequences, one token each."""
    step = scheduler.schedule()
    if step is not None:
        for s in step.seqs:
            if s.kv_row < 0:
                s.kv_row = max((r.kv_row for r in scheduler.running), default=-1) + 1
            s.output_ids.append(0)
    return step


def test_admission_stays_within_the_token_budget():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=10)
    first, second, third = seq(4), seq(4), seq(4)
    for s in (first, second, third):
        scheduler.add(s)
    step = run(scheduler)
    assert not step.is_decode and step.seqs == [first, second]  # 8 tokens; a third would make 12
    assert list(scheduler.waiting) == [third] and third.status is SequenceStatus.WAITING
    step = run(scheduler)
    assert not step.is_decode and step.seqs == [third]


def test_a_prompt_longer_than_the_budget_runs_alone():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=10)
    short, long, after = seq(3), seq(15), seq(1)
    for s in (short, long, after):
        scheduler.add(s)
    assert run(scheduler).seqs == [short]  # the long one does not join a batch it overflows
    assert run(scheduler).seqs == [long]  # but it is not left waiting forever
    assert run(scheduler).seqs == [after]


def test_admission_stays_within_the_sequence_limit():
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [seq(2) for _ in range(3)]
    for s in seqs:
        scheduler.add(s)
    assert run(scheduler).seqs == seqs[:2]
    step = run(scheduler)  # full: the running ones decode, the third waits
    assert step.is_decode and step.seqs == seqs[:2] and list(scheduler.waiting) == [seqs[2]]


def test_prefill_runs_before_decode_and_decode_runs_everyone_in_row_order():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    old = seq(3)
    scheduler.add(old)
    run(scheduler)
    new = seq(5)
    scheduler.add(new)
    step = run(scheduler)
    assert not step.is_decode and step.seqs == [new]  # the newcomer's prompt first
    old.kv_row, new.kv_row = 1, 0  # rows moved (a sequence left the cache)
    step = run(scheduler)
    assert step.is_decode and step.seqs == [new, old]


def test_steps_go_round_robin_between_providers_and_never_mix_them():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    a1, a2, b1 = seq(2, A), seq(2, A), seq(2, B)
    for s in (a1, b1, a2):
        scheduler.add(s)
    steps = [run(scheduler) for _ in range(6)]
    assert [(step.experts, step.is_decode) for step in steps] == [
        (A, False), (B, False), (A, True), (B, True), (A, True), (B, True)
    ]
    assert steps[0].seqs == [a1, a2] and steps[1].seqs == [b1]
    assert all({s.experts for s in step.seqs} == {step.experts} for step in steps)


def test_a_provider_without_work_loses_its_turn():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(2, A), seq(2, B)
    scheduler.add(a)
    scheduler.add(b)
    run(scheduler), run(scheduler)
    b.finish("length")
    scheduler.remove_finished()
    assert [run(scheduler).experts for _ in range(3)] == [A, A, A]


def test_abort_while_waiting_removes_it_from_the_queue():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    waiting, other = seq(2), seq(2)
    scheduler.add(waiting)
    scheduler.add(other)
    scheduler.abort(waiting)
    assert waiting.finish_reason == "abort" and list(scheduler.waiting) == [other]
    assert run(scheduler).seqs == [other]


def test_abort_while_running_leaves_at_the_next_removal():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    running, other = seq(2), seq(2)
    scheduler.add(running)
    scheduler.add(other)
    run(scheduler)
    scheduler.abort(running)
    assert scheduler.remove_finished() == [running] and running.finish_reason == "abort"
    step = run(scheduler)
    assert step.is_decode and step.seqs == [other]


def test_abort_of_the_last_sequence_of_a_provider_ends_its_turns():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(2, A), seq(2, B)
    scheduler.add(a)
    scheduler.add(b)
    run(scheduler)  # A prefills; B still waits
    scheduler.abort(b)
    assert [run(scheduler).experts for _ in range(2)] == [A, A]


def test_abort_after_finishing_changes_nothing():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    done = seq(2)
    scheduler.add(done)
    run(scheduler)
    done.finish("length")
    assert scheduler.remove_finished() == [done]
    scheduler.abort(done)
    assert done.finish_reason == "length" and not scheduler.has_unfinished() and scheduler.schedule() is None


def test_a_sequence_needs_its_provider_before_it_is_queued():
    scheduler = Scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    with pytest.raises(ValueError, match="expert provider"):
        scheduler.add(seq(2, experts=None))
