"""The scheduler on its own, in plain Python (no model, no tensors): admission under the token budget,
the sequence limit and the free KV blocks, prefill first, preemption by recompute, round-robin between
expert providers, abort in every state."""

from __future__ import annotations

import itertools

import pytest

from moeserve import SamplingParams
from moeserve.engine.scheduler import Scheduler
from moeserve.engine.sequence import Sequence, SequenceStatus
from moeserve.kv.blocks import BlockManager


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


def make_scheduler(max_num_seqs=8, max_num_batched_tokens=100, num_blocks=1000, block_size=4, windows=(None,)):
    return Scheduler(max_num_seqs, max_num_batched_tokens, BlockManager(num_blocks, block_size, windows))


def run(scheduler: Scheduler):
    """One step as the engine takes it: every token of the step is cached, then one is generated."""
    step = scheduler.schedule()
    if step is not None:
        for s in step.seqs:
            s.num_cached = s.num_tokens
            s.output_ids.append(0)
        scheduler.remove_finished()
    return step


def test_admission_stays_within_the_token_budget():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=10)
    first, second, third = seq(4), seq(4), seq(4)
    for s in (first, second, third):
        scheduler.add(s)
    step = run(scheduler)
    assert not step.is_decode and step.seqs == [first, second]  # 8 tokens; a third would make 12
    assert list(scheduler.waiting) == [third] and third.status is SequenceStatus.WAITING
    step = run(scheduler)
    assert not step.is_decode and step.seqs == [third]


def test_a_prompt_longer_than_the_budget_runs_alone():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=10)
    short, long, after = seq(3), seq(15), seq(1)
    for s in (short, long, after):
        scheduler.add(s)
    assert run(scheduler).seqs == [short]  # the long one does not join a batch it overflows
    assert run(scheduler).seqs == [long]  # but it is not left waiting forever
    assert run(scheduler).seqs == [after]


def test_admission_stays_within_the_sequence_limit():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [seq(2) for _ in range(3)]
    for s in seqs:
        scheduler.add(s)
    assert run(scheduler).seqs == seqs[:2]
    step = run(scheduler)  # full: the running ones decode, the third waits
    assert step.is_decode and step.seqs == seqs[:2] and list(scheduler.waiting) == [seqs[2]]


def test_prefill_runs_before_decode_and_decode_runs_everyone_shortest_first():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    old = seq(3)
    scheduler.add(old)
    run(scheduler)
    new = seq(5)
    scheduler.add(new)
    step = run(scheduler)
    assert not step.is_decode and step.seqs == [new]  # the newcomer's prompt first
    step = run(scheduler)
    assert step.is_decode and step.seqs == [old, new]  # 5 tokens, then 6


def test_steps_go_round_robin_between_providers_and_never_mix_them():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=100)
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
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(2, A), seq(2, B)
    scheduler.add(a)
    scheduler.add(b)
    run(scheduler), run(scheduler)
    b.finish("length")
    scheduler.remove_finished()
    assert [run(scheduler).experts for _ in range(3)] == [A, A, A]


def test_abort_while_waiting_removes_it_from_the_queue():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    waiting, other = seq(2), seq(2)
    scheduler.add(waiting)
    scheduler.add(other)
    scheduler.abort(waiting)
    assert waiting.finish_reason == "abort" and list(scheduler.waiting) == [other]
    assert run(scheduler).seqs == [other]


def test_abort_while_running_leaves_at_the_next_removal():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    running, other = seq(2), seq(2)
    scheduler.add(running)
    scheduler.add(other)
    run(scheduler)
    scheduler.abort(running)
    assert scheduler.remove_finished() == [running] and running.finish_reason == "abort"
    step = run(scheduler)
    assert step.is_decode and step.seqs == [other]


def test_abort_of_the_last_sequence_of_a_provider_ends_its_turns():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(2, A), seq(2, B)
    scheduler.add(a)
    scheduler.add(b)
    run(scheduler)  # A prefills; B still waits
    scheduler.abort(b)
    assert [run(scheduler).experts for _ in range(2)] == [A, A]


def test_abort_after_finishing_changes_nothing():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    done = seq(2)
    scheduler.add(done)
    run(scheduler)
    done.finish("length")
    assert scheduler.remove_finished() == [done]
    scheduler.abort(done)
    assert done.finish_reason == "length" and not scheduler.has_unfinished() and scheduler.schedule() is None


def test_a_sequence_needs_its_provider_before_it_is_queued():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    with pytest.raises(ValueError, match="expert provider"):
        scheduler.add(seq(2, experts=None))


# -- KV blocks ------------------------------------------------------------------------------------------


def test_admission_waits_for_free_blocks_and_keeps_room_for_the_next_tokens():
    # 9 usable blocks of 4 tokens: a 12-token prompt takes 3 blocks and its first generated token a 4th.
    scheduler = make_scheduler(num_blocks=10)
    first, second, third = seq(12), seq(12), seq(12)
    for s in (first, second, third):
        scheduler.add(s)
    step = run(scheduler)
    assert step.seqs == [first, second]  # the third would leave no block for the others' next tokens
    assert scheduler.blocks.blocks_in_use == 6
    step = run(scheduler)
    assert step.is_decode and scheduler.blocks.blocks_in_use == 8 and list(scheduler.waiting) == [third]


def test_a_short_decode_step_preempts_the_most_recently_admitted_and_requeues_it_first():
    scheduler = make_scheduler(num_blocks=7)  # 6 usable blocks of 4 tokens
    older, newer, latest = seq(7), seq(7), seq(3)
    scheduler.add(older)
    scheduler.add(newer)
    run(scheduler)  # 2 blocks each; 8 tokens each after their first generated one
    scheduler.add(latest)
    assert run(scheduler).seqs == [latest]  # 1 block; nobody's next token needs a new one
    step = run(scheduler)  # positions 7, 7 and 3 are in blocks already held
    assert step.is_decode and len(step.seqs) == 3 and scheduler.blocks.free_blocks == 1
    step = run(scheduler)  # each needs a new block now: 3 needed, 1 free
    assert scheduler.num_preemptions == 1
    assert step.seqs == [older, newer] and scheduler.waiting[0] is latest  # admitted last, preempted first
    assert latest.blocks is None and latest.num_cached == 0 and latest.status is SequenceStatus.WAITING
    assert len(latest.output_ids) == 2  # its tokens are kept: it recomputes their K/V when it runs again
    assert scheduler.blocks.free_blocks == 0


def test_finishing_and_aborting_return_every_block():
    scheduler = make_scheduler(num_blocks=20)
    done, aborted = seq(9), seq(9)
    scheduler.add(done)
    scheduler.add(aborted)
    run(scheduler)
    assert scheduler.blocks.blocks_in_use == 6
    done.finish("length")
    scheduler.remove_finished()
    assert scheduler.blocks.blocks_in_use == 3 and done.blocks is None
    scheduler.abort(aborted)
    scheduler.remove_finished()
    assert scheduler.blocks.blocks_in_use == 0 and scheduler.blocks.free_blocks == 19


def test_a_sliding_window_group_lets_go_of_blocks_the_window_has_left():
    manager = BlockManager(num_blocks=200, block_size=4, windows=(None, 8))
    tables = manager.new_tables()
    for tokens in range(1, 401):
        manager.cover(tables, tokens)
        manager.leave_window(tables, tokens)
        sliding = [b for b in tables.tables[1] if b != 0]
        assert len(sliding) <= 8 // 4 + 2
        assert len(tables.tables[0]) == -(-tokens // 4)  # the full group keeps every block
    # the blocks still held are exactly the ones the next query's window reaches (positions 393..399 so far)
    assert [i for i, b in enumerate(tables.tables[1]) if b != 0] == [98, 99]
    manager.release(tables)
    assert manager.blocks_in_use == 0


def test_freed_blocks_are_reused_first():
    manager = BlockManager(num_blocks=100, block_size=4, windows=(None,))
    a, b = manager.new_tables(), manager.new_tables()
    manager.cover(a, 8)
    manager.release(a)
    manager.cover(b, 8)
    assert manager.peak_in_use == 2 and sorted(b.tables[0]) == [1, 2]
