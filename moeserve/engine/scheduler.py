"""Chooses which sequences run in the next step: continuous batching with prefill first.

Plain Python with no tensors, so it can be tested on its own. Each step is either an extend
step (newly admitted sequences bring their prompts) or a decode step (every running sequence
brings one token). Finished sequences leave between steps; waiting ones join when there is room.

Groups: a sequence may be added with a group (the server uses the expert provider of the policy
variant it was submitted under). One step runs sequences of one group only, so one provider serves
the whole step; with several groups holding work, steps go round-robin between them. Without
groups (every sequence in group None) scheduling is exactly the single-group rule above.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Hashable

from moeserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    is_decode: bool
    group: Hashable | None = None  # the group every sequence of the step belongs to


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._group: dict[Sequence, Hashable] = {}  # only sequences added with a group
        self._last_group: Hashable | None = None

    def add(self, seq: Sequence, group: Hashable | None = None) -> None:
        if group is not None:
            self._group[seq] = group
        self.waiting.append(seq)

    def group_of(self, seq: Sequence) -> Hashable | None:
        return self._group.get(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep | None:
        if not self._group:
            return self._schedule_group(self.waiting, self.running, None)
        # Round-robin: the groups with work, starting after the one scheduled last.
        groups = list(dict.fromkeys(self.group_of(s) for s in (*self.running, *self.waiting)))
        start = groups.index(self._last_group) + 1 if self._last_group in groups else 0
        for group in groups[start:] + groups[:start]:
            waiting = deque(s for s in self.waiting if self.group_of(s) == group)
            step = self._schedule_group(waiting, [s for s in self.running if self.group_of(s) == group], group)
            if step is not None:
                if not step.is_decode:
                    chosen = set(step.seqs)
                    self.waiting = deque(s for s in self.waiting if s not in chosen)
                self._last_group = group
                return step
        return None

    def _schedule_group(self, waiting: deque[Sequence], running: list[Sequence], group) -> ScheduledStep | None:
        """Prefill-first over `waiting` (consumed in place), else a decode step of `running`."""
        admitted: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            cost = waiting[0].num_tokens
            # A prompt longer than the whole budget still runs, alone, rather than waiting forever.
            if admitted and cost > budget:
                break
            seq = waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            admitted.append(seq)
            budget -= cost
        if admitted:
            self.running.extend(admitted)
            return ScheduledStep(admitted, is_decode=False, group=group)
        if running:
            # Cache-row order lets the attention read rows 0..B-1 as one slice.
            return ScheduledStep(sorted(running, key=lambda s: s.kv_row), is_decode=True, group=group)
        return None

    def remove_finished(self) -> list[Sequence]:
        finished = [seq for seq in self.running if seq.is_finished]
        if finished:
            self.running = [seq for seq in self.running if not seq.is_finished]
            for seq in finished:
                self._group.pop(seq, None)
        return finished

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._group.pop(seq, None)
        seq.finish("abort")
