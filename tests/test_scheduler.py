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


def make_scheduler(max_num_seqs=8, max_num_batched_tokens=100, num_blocks=1000, block_size=4, windows=(None,),
                   prefix_caching=False):
    blocks = BlockManager(num_blocks, block_size, windows, prefix_caching)
    return Scheduler(max_num_seqs, max_num_batched_tokens, blocks)


def run(scheduler: Scheduler):
    """One step as the engine takes it: the step's tokens are cached, then every sequence with all its
    tokens cached generates one."""
    step = scheduler.schedule()
    if step is not None:
        for s, count in zip(step.seqs, step.counts or [1] * len(step.seqs)):
            s.num_cached += count
            scheduler.blocks.commit(s.blocks, s.prompt_ids, s.output_ids, s.num_cached, s.cache_salt)
            if s.num_cached == s.num_tokens:
                s.output_ids.append(0)
        scheduler.remove_finished()
    return step


def test_prompts_share_the_token_budget_and_the_last_one_in_is_chunked():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=10)
    first, second, third = seq(4), seq(4), seq(4)
    for s in (first, second, third):
        scheduler.add(s)
    step = run(scheduler)
    assert not step.is_decode and step.seqs == [first, second, third] and step.counts == [4, 4, 2]
    assert third.num_cached == 2 and not third.output_ids  # part-way: no token yet
    step = run(scheduler)  # the two decode and the third's last 2 prompt tokens, in one step
    assert not step.is_decode and step.seqs == [first, second, third] and step.counts == [1, 1, 2]
    assert len(third.output_ids) == 1
    assert run(scheduler).is_decode


def test_a_prompt_longer_than_the_budget_prefills_in_chunks_while_the_others_decode():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=10)
    short, long = seq(3), seq(25)
    scheduler.add(short)
    scheduler.add(long)
    steps = [run(scheduler) for _ in range(4)]
    assert [step.counts for step in steps] == [[3, 7], [1, 10], [1, 8], None]  # then a plain decode step
    assert [step.seqs for step in steps[:3]] == [[short, long]] * 3
    assert len(short.output_ids) == 4 and len(long.output_ids) == 2
    for step in steps[:3]:  # never more than the budget of prompt tokens
        assert sum(n for s, n in zip(step.seqs, step.counts) if s is long or n > 1) <= 10


def test_admission_stays_within_the_sequence_limit():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [seq(2) for _ in range(3)]
    for s in seqs:
        scheduler.add(s)
    assert run(scheduler).seqs == seqs[:2]
    step = run(scheduler)  # full: the running ones decode, the third waits
    assert step.is_decode and step.seqs == seqs[:2] and list(scheduler.waiting) == [seqs[2]]


def test_a_prompt_joins_the_running_ones_next_token_and_decode_runs_everyone_shortest_first():
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=100)
    old = seq(3)
    scheduler.add(old)
    run(scheduler)
    new = seq(5)
    scheduler.add(new)
    step = run(scheduler)
    assert not step.is_decode and step.seqs == [old, new] and step.counts == [1, 5]
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
    older, newer = seq(7), seq(7)
    scheduler.add(older)
    scheduler.add(newer)
    for _ in range(6):  # the prefill, then decode steps up to 12 cached tokens each: 3 blocks each
        run(scheduler)
    assert scheduler.blocks.free_blocks == 0 and scheduler.num_preemptions == 0
    step = run(scheduler)  # each needs a fourth block now
    assert scheduler.num_preemptions == 1
    assert step.seqs == [older] and scheduler.waiting[0] is newer  # admitted last, preempted first
    assert newer.blocks is None and newer.num_cached == 0 and newer.status is SequenceStatus.WAITING
    assert len(newer.output_ids) == 6  # its tokens are kept: it recomputes their K/V when it runs again


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


# -- prefix caching -------------------------------------------------------------------------------------


def prompt_seq(tokens: list[int], salt: bytes = b"policy-a") -> Sequence:
    s = Sequence(next(_ids), list(tokens), SamplingParams(max_tokens=4), 64, None, None)
    s.experts, s.cache_salt = A, salt
    return s


def test_a_prompt_takes_the_cached_blocks_of_a_shared_prefix_and_computes_only_the_rest():
    scheduler = make_scheduler(prefix_caching=True)
    first = prompt_seq(list(range(10)))
    scheduler.add(first)
    run(scheduler)  # blocks [0..3] and [4..7] are full: both findable
    second = prompt_seq(list(range(8)) + [50, 51, 52])
    scheduler.add(second)
    step = run(scheduler)
    assert step.seqs == [first, second] and step.counts == [1, 3]  # 8 of its 11 tokens were cached
    assert second.num_cached_prompt_tokens == 8 and second.blocks.tables[0][:2] == first.blocks.tables[0][:2]
    assert scheduler.blocks.prefix_queries == 10 + 11 and scheduler.blocks.prefix_hits == 8


def test_at_least_one_token_is_computed_and_only_full_blocks_are_shared():
    scheduler = make_scheduler(prefix_caching=True)
    scheduler.add(prompt_seq(list(range(8))))
    run(scheduler)
    again = prompt_seq(list(range(8)))  # the same 8 tokens: its last one must run to give logits
    scheduler.add(again)
    step = run(scheduler)
    assert again.num_cached_prompt_tokens == 4 and step.counts[-1] == 4


def test_another_salt_never_shares_a_block():
    scheduler = make_scheduler(prefix_caching=True)
    scheduler.add(prompt_seq(list(range(10)), salt=b"policy-a"))
    run(scheduler)
    other = prompt_seq(list(range(10)), salt=b"policy-b")
    scheduler.add(other)
    run(scheduler)
    assert other.num_cached_prompt_tokens == 0


def test_released_cached_blocks_stay_findable_until_their_memory_is_needed_least_recent_first():
    scheduler = make_scheduler(num_blocks=13, prefix_caching=True)  # 12 usable blocks of 4
    old, recent = prompt_seq([1] * 8), prompt_seq([2] * 8)
    big = prompt_seq(list(range(100, 138)))  # 38 tokens: 10 blocks, the 8 never used and 2 cached ones
    for s in (old, recent, big):
        scheduler.add(s)
        run(scheduler)
        s.finish("length")
        scheduler.remove_finished()
    assert scheduler.blocks.blocks_in_use == 0 and scheduler.blocks.free_blocks == 12
    again_recent, again_old = prompt_seq([2] * 8 + [7]), prompt_seq([1] * 8 + [7])
    for s in (again_recent, again_old):
        scheduler.add(s)
    run(scheduler)
    assert again_recent.num_cached_prompt_tokens == 8  # released last: still cached
    assert again_old.num_cached_prompt_tokens == 0  # released first: its blocks went to `big`


def test_prompts_admitted_in_one_step_share_the_blocks_the_first_fills():
    scheduler = make_scheduler(prefix_caching=True)
    first, second = prompt_seq(list(range(12))), prompt_seq(list(range(8)) + [40, 41])
    scheduler.add(first)
    scheduler.add(second)
    step = run(scheduler)
    assert step.seqs == [first, second] and step.counts == [12, 2]  # the layer writes first's K/V before reading
    assert second.blocks.tables[0][:2] == first.blocks.tables[0][:2] and second.num_cached_prompt_tokens == 8
