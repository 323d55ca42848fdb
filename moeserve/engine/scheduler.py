"""Chooses which sequences run in the next step: continuous batching with prefill first.

Plain Python with no tensors, so it can be tested on its own. Each step is either an extend
step (newly admitted sequences bring their prompts) or a decode step (every running sequence
brings one token). Finished sequences leave between steps; waiting ones join when there is room.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from moeserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    is_decode: bool


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep | None:
        admitted: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            cost = self.waiting[0].num_tokens
            # A prompt longer than the whole budget still runs, alone, rather than waiting forever.
            if admitted and cost > budget:
                break
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            admitted.append(seq)
            budget -= cost
        if admitted:
            self.running.extend(admitted)
            return ScheduledStep(admitted, is_decode=False)
        if self.running:
            # Cache-row order lets the attention read rows 0..B-1 as one slice.
            return ScheduledStep(sorted(self.running, key=lambda s: s.kv_row), is_decode=True)
        return None

    def remove_finished(self) -> list[Sequence]:
        finished = [seq for seq in self.running if seq.is_finished]
        if finished:
            self.running = [seq for seq in self.running if not seq.is_finished]
        return finished

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish("abort")
