"""Chooses which sequences run in the next step: continuous batching with prefill first.

Plain Python with no tensors, so it can be tested on its own. Each step is either an extend
step (newly admitted sequences bring their prompts) or a decode step (every running sequence
brings one token). Finished sequences leave between steps; waiting ones join when there is room.

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


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    is_decode: bool

    @property
    def experts(self) -> ExpertProvider:
        """The provider every sequence of the step runs on."""
        return self.seqs[0].experts


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
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
            return ScheduledStep(admitted, is_decode=False)
        if running:
            # Cache-row order lets the attention read rows 0..B-1 as one slice.
            return ScheduledStep(sorted(running, key=lambda s: s.kv_row), is_decode=True)
        return None

    def remove_finished(self) -> list[Sequence]:
        finished = [seq for seq in self.running if seq.is_finished]
        if finished:
            self.running = [seq for seq in self.running if not seq.is_finished]
        return finished

    def abort(self, seq: Sequence) -> None:
        """Finish `seq` as aborted (a running one leaves at the next `remove_finished`); a finished one stays as is."""
        if seq.is_finished:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish("abort")
