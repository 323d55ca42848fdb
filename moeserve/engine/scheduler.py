"""Chooses which sequences run in the next step: continuous batching with chunked prefill.

Plain Python with no tensors, so it can be tested on its own. While prompts wait or are part-way
through their prefill, a step is an extend step that carries every running sequence's next token plus
at most `max_num_batched_tokens` prompt tokens: first the next chunks of prompts already admitted, then
newly admitted ones (SARATHI's mixed steps, as vLLM's chunked prefill). A long prompt so prefills over
several steps and the running streams keep getting tokens meanwhile. Otherwise a step is a decode step:
every running sequence brings one token. Only sequences whose every token is computed sample one.

Memory is KV blocks (kv/blocks.py). A waiting sequence first takes the longest prefix of its tokens found
in the prefix cache (when on), then is admitted only when its chunk's blocks are free and, after it, so are
the blocks every running sequence needs for its next token: an admission never forces the very next step
to preempt. A step that still runs short takes the blocks of the most recently admitted running sequence
(preemption by recompute): it goes back to the front of the queue, keeps its generated tokens and
recomputes their K/V when it is admitted again, so its output is the one an uninterrupted run gives.
Finished and aborted sequences return their blocks.

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
from moeserve.kv.blocks import BlockManager, blocks_for


# Prompt tokens a step carries by default: with offloaded experts each chunk loads nearly every expert it
# uses again (bench/chunked_prefill.py: ~51 loads per chunk of 512 tokens on its model, 59 for one pass of
# 2048), so chunks are kept large enough to amortize that, and small enough that a step stays short.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    is_decode: bool
    counts: list[int] | None = None  # extend steps: the tokens each sequence computes (its next uncached ones)

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
        """A mixed extend step while `waiting` (consumed in place) or a partial prefill has work, else a
        decode step of `running`."""
        prefilling = [seq for seq in running if seq.num_tokens - seq.num_cached > 1]
        if not prefilling and (not waiting or len(self.running) >= self.max_num_seqs):
            running = self._make_room(running, [1] * len(running))
            for seq in running:
                self.blocks.cover(seq.blocks, seq.num_tokens)
            return self._decode_step(running)
        budget = self.max_num_batched_tokens
        seqs = [seq for seq in running if seq.num_tokens - seq.num_cached <= 1]  # decoding: one token each
        counts = [1] * len(seqs)
        for seq in prefilling:  # the next chunks of prompts already admitted, oldest first
            if budget == 0:
                break
            seqs.append(seq)
            counts.append(min(seq.num_tokens - seq.num_cached, budget))
            budget -= counts[-1]
        kept = self._make_room(seqs, counts)
        counts = [count for seq, count in zip(seqs, counts) if seq in kept]
        seqs = kept
        for seq, count in zip(seqs, counts):
            self.blocks.cover(seq.blocks, seq.num_cached + count)
            self._announce(seq, count)
        # blocks the step after this one needs for the running sequences' next tokens, kept free
        reserved = sum(self.blocks.blocks_to_cover(s.blocks, s.num_tokens + 1) for s in seqs if s.num_tokens - s.num_cached <= 1)
        decoding = len(seqs) - len([s for s in seqs if s in prefilling])
        while waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = waiting[0]
            count = self._admit(seq, budget, reserved)
            if count is None:
                break
            waiting.popleft()
            seqs.append(seq)
            counts.append(count)
            budget -= count
            if seq.num_cached + count == seq.num_tokens:  # it samples after this step: its next token's block
                reserved += self.blocks.blocks_to_cover(seq.blocks, seq.num_tokens + 1)
        if len(seqs) == decoding:  # no prompt got a chunk in: a plain decode step
            return self._decode_step(seqs)
        return ScheduledStep(seqs, is_decode=False, counts=counts)

    @staticmethod
    def _decode_step(seqs: list[Sequence]) -> ScheduledStep | None:
        # Length order: attention that gathers blocks reads rows of similar length together (kv/context.py).
        return ScheduledStep(sorted(seqs, key=lambda s: s.num_tokens), is_decode=True) if seqs else None

    def _admit(self, seq: Sequence, budget: int, reserved: int) -> int | None:
        """Take `seq`'s cached prefix and the blocks of its first chunk, and mark it running; the chunk's
        tokens, or None when the blocks are not free (nothing is taken then)."""
        hit = None
        # A first prefill that asks for prompt logprobs needs them at the cached positions too (kv/blocks.py).
        logprobs = seq.params.prompt_logprobs if not seq.output_ids else None
        if seq.blocks is None:
            hit = self.blocks.find(seq.all_ids, seq.num_tokens - 1, seq.cache_salt, logprobs)  # one token left to compute
        cached = hit.tokens(self.blocks.block_size) if hit is not None else 0
        count = min(seq.num_tokens - cached, budget)
        covered = len(hit.hashes) if hit is not None else 0
        size, groups = self.blocks.block_size, len(self.blocks.windows)
        needed = (blocks_for(cached + count, size) - covered) * groups + (hit.idle if hit is not None else 0)
        after = 0
        if cached + count == seq.num_tokens and (cached + count) % size == 0:
            after = groups  # its first generated token starts a block
        if needed + after + reserved > self.blocks.free_blocks:
            return None
        seq.blocks = seq.blocks or self.blocks.new_tables()
        if hit is not None:
            self.blocks.adopt(seq.blocks, hit)
            seq.num_cached = cached
            if logprobs is not None:
                seq.prompt_logprobs = self.blocks.prompt_logprobs(hit, seq.prompt_ids)
        if not seq.output_ids:
            seq.num_cached_prompt_tokens = cached
            self.blocks.count_query(seq.num_tokens, cached)
        self.blocks.cover(seq.blocks, cached + count)
        self._announce(seq, count)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return count

    def _announce(self, seq: Sequence, count: int) -> None:
        """Make the blocks `seq` fills in this step findable now: a prompt admitted later in the same step may
        share them, as every layer writes the step's K/V before any of its attention reads them."""
        self.blocks.commit(seq.blocks, seq.prompt_ids, seq.output_ids, seq.num_cached + count, seq.cache_salt)

    def _make_room(self, seqs: list[Sequence], counts: list[int]) -> list[Sequence]:
        """Preempt the most recently admitted sequences until the rest of `seqs` have the blocks for their
        next `counts` tokens; `seqs` less the preempted."""
        if len(seqs) * len(self.blocks.windows) <= self.blocks.free_blocks and all(n == 1 for n in counts):
            return seqs  # one token each takes at most a block per group: room enough (every decode step)
        seqs, counts = list(seqs), list(counts)
        while seqs and sum(self.blocks.blocks_to_cover(s.blocks, s.num_cached + n) for s, n in zip(seqs, counts)) > self.blocks.free_blocks:
            victim = self.running[-1]  # admitted last (of any provider: every one shares the blocks)
            self.preempt(victim)
            if victim in seqs:
                i = seqs.index(victim)
                del seqs[i], counts[i]
        return seqs

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
