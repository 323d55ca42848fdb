"""Chooses which sequences run in the next step: continuous batching with prefill first.

Plain Python with no tensors, so it can be tested on its own. Each step is either an extend
step (newly admitted sequences bring their prompts) or a decode step (every running sequence
brings one token). Finished sequences leave between steps; waiting ones join when there is room.

Memory is KV blocks (kv/blocks.py). A waiting sequence is admitted only when its tokens' blocks are free
and, after it, so are the blocks every running sequence (it included) needs for its next token: an
admission never forces the very next decode step to preempt. A decode step that still runs short takes
the blocks of the most recently admitted running sequence (preemption by recompute): it goes back to the
front of the queue, keeps its generated tokens and recomputes their K/V when it is admitted again, so its
output is the one an uninterrupted run gives. Finished and aborted sequences return their blocks.

Groups: every sequence runs on the expert provider it was submitted with (`Sequence.experts`; the
server gives each policy variant its own). One step runs sequences of one provider only, so one
provider serves the whole step; with several providers holding work, steps go round-robin between
them. With one provider, scheduling is exactly the single-group rule above.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from moeserve.engine.sequence import Sequence, SequenceStatus
from moeserve.experts import ExpertProvider
from moeserve.kv.blocks import BlockManager


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    is_decode: bool

    @property
    def experts(self) -> ExpertProvider:
        """The provider every sequence of the step runs on."""
        return self.seqs[0].experts


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, blocks: BlockManager):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.blocks = blocks
        self.num_preemptions = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._last_group: ExpertProvider | None = None

    def add(self, seq: Sequence) -> None:
        """Queue a sequence whose `experts` is set."""
        if seq.experts is None:
            raise ValueError("a sequence must have its expert provider before it is scheduled")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep | None:
        # Round-robin: the providers with work, starting after the one scheduled last.
        groups = list(dict.fromkeys(s.experts for s in (*self.running, *self.waiting)))
        if len(groups) <= 1:
            return self._schedule_group(self.waiting, self.running)
        start = groups.index(self._last_group) + 1 if self._last_group in groups else 0
        for group in groups[start:] + groups[:start]:
            waiting = deque(s for s in self.waiting if s.experts is group)
            step = self._schedule_group(waiting, [s for s in self.running if s.experts is group])
            if step is not None:
                if not step.is_decode:
                    chosen = set(step.seqs)
                    self.waiting = deque(s for s in self.waiting if s not in chosen)
                self._last_group = group
                return step
        return None

    def _schedule_group(self, waiting: deque[Sequence], running: list[Sequence]) -> ScheduledStep | None:
        """Prefill-first over `waiting` (consumed in place), else a decode step of `running`."""
        admitted: list[Sequence] = []
        budget = self.max_num_batched_tokens
        # blocks the running sequences' next tokens need, kept free through admission
        reserved = sum(self._next_token_blocks(seq) for seq in self.running) if waiting else 0
        while waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = waiting[0]
            cost = seq.num_tokens
            # A prompt longer than the whole budget still runs, alone, rather than waiting forever.
            if admitted and cost > budget:
                break
            needed = self.blocks.blocks_to_cover(seq.blocks, seq.num_tokens)
            after = self.blocks.blocks_to_cover(seq.blocks, seq.num_tokens + 1) - needed
            if needed + after + reserved > self.blocks.free_blocks:
                break
            waiting.popleft()
            if seq.blocks is None:
                seq.blocks = self.blocks.new_tables()
            self.blocks.cover(seq.blocks, seq.num_tokens)
            reserved += after
            seq.status = SequenceStatus.RUNNING
            admitted.append(seq)
            budget -= cost
        if admitted:
            self.running.extend(admitted)
            return ScheduledStep(admitted, is_decode=False)
        running = self._make_room(running)
        if running:
            for seq in running:
                self.blocks.cover(seq.blocks, seq.num_tokens)
            # Length order: attention that gathers blocks reads rows of similar length together (kv/context.py).
            return ScheduledStep(sorted(running, key=lambda s: s.num_tokens), is_decode=True)
        return None

    def _next_token_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` must take before its next decode step."""
        return self.blocks.blocks_to_cover(seq.blocks, seq.num_tokens)

    def _make_room(self, running: list[Sequence]) -> list[Sequence]:
        """Preempt the most recently admitted sequences until `running`'s next tokens have their blocks;
        `running` less the preempted."""
        running = list(running)
        while running and sum(self._next_token_blocks(s) for s in running) > self.blocks.free_blocks:
            victim = self.running[-1]  # admitted last (of any provider: every one shares the blocks)
            self.preempt(victim)
            if victim in running:
                running.remove(victim)
        return running

    def preempt(self, seq: Sequence) -> None:
        """Take `seq`'s blocks back and queue it first; it recomputes its K/V when it runs again."""
        self.running.remove(seq)
        self.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def remove_finished(self) -> list[Sequence]:
        """Finished sequences leave, returning their blocks."""
        finished = [seq for seq in self.running if seq.is_finished]
        if finished:
            self.running = [seq for seq in self.running if not seq.is_finished]
            for seq in finished:
                self.release(seq)
        return finished

    def release(self, seq: Sequence) -> None:
        """Return `seq`'s blocks; it holds no cached tokens afterwards."""
        if seq.blocks is not None:
            self.blocks.release(seq.blocks)
            seq.blocks = None
        seq.num_cached = 0

    def abort(self, seq: Sequence) -> None:
        """Finish `seq` as aborted (a running one leaves at the next `remove_finished`); a finished one stays as is."""
        if seq.is_finished:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish("abort")
