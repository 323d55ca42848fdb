"""The async scheduler: HTTP requests in, a step thread driving `LLMEngine`, token updates out.

    event loop (requests)                          step thread (owns LLMEngine, CPU or GPU compute)
    add_request ─ admission (429/503), bind to ─► commands deque ─► engine.submit(seq, provider)
                  the variant's current policy                     engine.step()  (continuous batching:
                                                                   new sequences join at step
                                                                   boundaries, finished ones leave)
    RequestHandle.queue ◄── call_soon_threadsafe ◄─ per step: the engine's StepOutputs (new tokens,
      (one asyncio queue per request)              logprobs, text delta, finish reason), forwarded
                                                   as SeqUpdates tagged with the choice index
    handle.abort() (client gone) ──────────────► commands deque ─► engine.abort(seq): KV row freed

Only the step thread touches the engine, its scheduler and the sequences' mutable state; it forwards
the step's outputs, which share nothing with the engine. Commands to it are small dataclasses.
Bookkeeping (in-flight counts, metrics, policy generations) lives on the event loop. One request may
hold several sequences (n > 1, or a list of prompts); its updates arrive on one queue, tagged with
the choice index.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator

from moeserve.engine.llm_engine import LLMEngine
from moeserve.engine.outputs import StepOutput
from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.sequence import Sequence, TokenLogprobs
from moeserve.experts import ExpertProvider
from moeserve.server.errors import ApiError
from moeserve.server.metrics import ServerMetrics
from moeserve.server.variants import PolicyGeneration, Variant

logger = logging.getLogger("moeserve.server")


@dataclass(slots=True)
class SeqUpdate:
    """What one sequence did in one step (a snapshot: nothing here is shared with the engine)."""

    index: int  # choice index within the request
    token_ids: list[int]  # new tokens
    logprobs: list[TokenLogprobs]  # their log-probabilities, when requested
    text_delta: str  # new text, never taken back (a matched stop string is never part of it)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    prompt_logprobs: list | None = None  # first update only, when requested
    step_start: float = 0.0  # monotonic start of the step that produced it
    error: BaseException | None = None  # the step failed (a bug): the request ends with a 500

    @classmethod
    def of(cls, index: int, output: StepOutput, step_start: float) -> SeqUpdate:
        return cls(
            index,
            output.token_ids,
            output.logprobs,
            output.text_delta,
            output.finish_reason,
            output.stop_reason,
            output.prompt_logprobs,
            step_start,
        )


@dataclass(frozen=True, slots=True)
class Submit:
    handle: RequestHandle
    experts: ExpertProvider  # the provider of the handle's policy generation
    cache_salt: str  # its policy's fingerprint: prefix-cache blocks are shared only under the same policy


@dataclass(frozen=True, slots=True)
class Abort:
    seqs: list[Sequence]


@dataclass(frozen=True, slots=True)
class Release:
    generation: PolicyGeneration  # retired, with no sequence left: close its provider


@dataclass(frozen=True, slots=True)
class Stop:
    pass


Command = Submit | Abort | Release | Stop


class RequestHandle:
    """One HTTP request in flight: its sequences, their policy generation, and their update queue."""

    def __init__(self, engine: AsyncEngine, seqs: list[Sequence], variant: Variant, generation: PolicyGeneration):
        self.request_id = uuid.uuid4().hex
        self.engine, self.seqs, self.variant, self.generation = engine, seqs, variant, generation
        self.arrival = time.monotonic()
        self.queue: asyncio.Queue[SeqUpdate] = asyncio.Queue()
        self.finished = [False] * len(seqs)
        self.first_token_time: float | None = None
        self._last_token_time: list[float | None] = [None] * len(seqs)
        self.closed = False  # aborted, or every sequence finished

    async def updates(self) -> AsyncIterator[list[SeqUpdate]]:
        """Batches of updates in arrival order (all that are ready at once), until every sequence has finished."""
        pending = len(self.seqs)
        while pending:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            for update in batch:
                if update.error is not None:
                    raise update.error
                if update.finish_reason is not None:
                    pending -= 1
            yield batch

    def abort(self) -> None:
        """Cancel whatever has not finished (the client went away); idempotent."""
        self._end(None)

    def fail(self, error: BaseException) -> None:
        """End whatever has not finished with `error` for its reader (the shutdown's drain ran out of time)."""
        self._end(error)

    def _end(self, error: BaseException | None) -> None:
        if self.closed:
            return
        unfinished = [i for i, done in enumerate(self.finished) if not done]
        for i in unfinished:
            self._finish(i, "abort")
            self.queue.put_nowait(SeqUpdate(i, [], [], "", "abort", error=error))
        self.engine.cancel([self.seqs[i] for i in unfinished])

    def deliver(self, update: SeqUpdate, now: float) -> None:
        """Event loop: one update from the step thread, into the metrics and the queue."""
        metrics, name = self.engine.metrics, self.variant.name
        if update.token_ids:
            if self.first_token_time is None:
                self.first_token_time = now
                metrics.ttft.labels(name).observe(now - self.arrival)
                metrics.queue_time.labels(name).observe(max(0.0, update.step_start - self.arrival))
            last = self._last_token_time[update.index]
            if last is not None:
                metrics.itl.labels(name).observe(now - last)
            self._last_token_time[update.index] = now
            metrics.generation_tokens.labels(name).inc(len(update.token_ids))
        if update.finish_reason is not None or update.error is not None:
            self._finish(update.index, update.finish_reason or "error")
        self.queue.put_nowait(update)

    def _finish(self, index: int, reason: str) -> None:
        self.finished[index] = True
        self.closed = all(self.finished)
        self.engine.sequence_finished(self, reason)


class AsyncEngine:
    """Owns the step thread. `max_waiting`: sequences allowed to queue beyond the running limit."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_waiting: int = 256):
        self.engine = engine
        self.metrics = metrics
        self.max_num_seqs = engine.scheduler.max_num_seqs
        self.capacity = self.max_num_seqs + max_waiting  # sequences in the server at once
        self.num_seqs = 0  # admitted and unfinished (event loop's count)
        self.draining = False
        self.failure: BaseException | None = None  # the step thread died
        self.steps = 0
        self._handles: set[RequestHandle] = set()
        self._commands: deque[Command] = deque()
        self._wake = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- event loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="moeserve-step", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per variant name: (running requests, waiting requests). A request runs once it has a token."""
        result: dict[str, list[int]] = {}
        for handle in self._handles:
            entry = result.setdefault(handle.variant.name, [0, 0])
            entry[0 if handle.first_token_time is not None else 1] += 1
        return {name: (r, w) for name, (r, w) in result.items()}

    async def add_request(
        self, prompts: list[str | list[int]], params: list[SamplingParams], variant: Variant
    ) -> RequestHandle:
        """Admit one request: `params` holds n choices per prompt, prompt-major (choice i runs on
        prompt i // n). Tokenizing and validating (InputError → 400) happen off the event loop."""
        if self.draining or not self.healthy:
            raise ApiError(503, "the server is shutting down or its engine stopped; retry on another server.")
        count = len(params)
        if self.num_seqs + count > self.capacity:
            raise ApiError(
                429,
                f"the server is at capacity ({self.num_seqs} sequences running or waiting, limit {self.capacity}); "
                f"retry later.",
                code="server_overloaded",
            )
        self.num_seqs += count  # reserved now: the await below lets other requests in
        try:
            per_prompt = count // len(prompts)
            seqs = await asyncio.to_thread(
                lambda: [self.engine.make_sequence(prompts[i // per_prompt], p) for i, p in enumerate(params)]
            )
        except BaseException:
            self.num_seqs -= count
            raise
        generation = variant.current  # bound here: this request runs wholly under this policy
        generation.live += count
        handle = RequestHandle(self, seqs, variant, generation)
        self._handles.add(handle)
        self.metrics.prompt_tokens.labels(variant.name).inc(sum(len(s.prompt_ids) for s in seqs))
        self._send(Submit(handle, generation.experts, generation.fingerprint))
        return handle

    def cancel(self, seqs: list[Sequence]) -> None:
        """Abort these sequences on the step thread (their KV blocks and scheduler slots are freed)."""
        self._send(Abort(seqs))

    def sequence_finished(self, handle: RequestHandle, reason: str) -> None:
        """Event loop bookkeeping for one finished (or aborted) sequence of `handle`."""
        handle.generation.live -= 1
        self.num_seqs -= 1
        self.metrics.request_success.labels(handle.variant.name, reason).inc()
        if handle.closed:
            self.metrics.e2e.labels(handle.variant.name).observe(time.monotonic() - handle.arrival)
            self._handles.discard(handle)
            self._retire(handle.variant)

    async def drain(self, timeout: float) -> None:
        """Refuse new requests (503) and let the running ones finish, for up to `timeout` s; those still
        running then end with a 503 (a stream: with an error event, then [DONE])."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._handles and time.monotonic() < deadline and self.healthy:
            await asyncio.sleep(0.05)
        cut = ApiError(
            503,
            f"the server shut down before this response finished (it gives running requests {timeout:g} s); "
            f"send the request again.",
        )
        for handle in list(self._handles):
            handle.fail(cut)

    async def shutdown(self, timeout: float) -> None:
        """Drain (up to `timeout` s; at once when already drained), then stop the step thread."""
        await self.drain(timeout)
        self._send(Stop())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def switch(self, variant: Variant, runtime) -> None:
        """Serve new requests of `variant` with `runtime` (requests in flight keep their policy)."""
        variant.install(runtime)
        self._retire(variant)

    def _send(self, command: Command) -> None:
        self._commands.append(command)
        self._wake.set()

    def _dispatch(self, updates: list[tuple[RequestHandle, SeqUpdate]]) -> None:
        now = time.monotonic()
        for handle, update in updates:
            if not handle.closed:
                handle.deliver(update, now)

    def _retire(self, variant: Variant) -> None:
        for generation in variant.collect_retired():
            self._send(Release(generation))

    # ---- step thread -----------------------------------------------------------------------

    def _run(self) -> None:
        active: dict[int, tuple[RequestHandle, int]] = {}  # seq_id → (handle, choice index)
        try:
            while True:
                if not self._apply_commands(active):
                    return
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                start = time.monotonic()
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # a bug: fail the requests in flight, keep serving
                    logger.exception("engine step failed; the requests in it end with an error")
                    updates = [(h, SeqUpdate(i, [], [], "", error=exc)) for h, i in active.values()]
                    for handle, index in active.values():
                        try:
                            self.engine.abort(handle.seqs[index])
                        except Exception:
                            logger.exception("could not abort a sequence after the failed step")
                    active.clear()
                else:
                    self.steps += 1
                    updates = []
                    for output in outputs:
                        handle, index = active[output.seq_id]
                        if output.finish_reason is not None:
                            del active[output.seq_id]
                        updates.append((handle, SeqUpdate.of(index, output, start)))
                if updates:
                    self._loop.call_soon_threadsafe(self._dispatch, updates)
        except BaseException as exc:  # the thread itself broke: report unhealthy rather than hang clients
            logger.exception("the step thread stopped")
            self.failure = exc
            failed = [(h, SeqUpdate(i, [], [], "", error=exc)) for h, i in active.values()]
            if failed and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._dispatch, failed)

    def _apply_commands(self, active: dict[int, tuple[RequestHandle, int]]) -> bool:
        """Between steps: submissions, aborts, policy releases. False on stop."""
        while self._commands:
            command = self._commands.popleft()
            if isinstance(command, Submit):
                for index, seq in enumerate(command.handle.seqs):
                    active[seq.seq_id] = (command.handle, index)
                    self.engine.submit(seq, command.experts, command.cache_salt)
            elif isinstance(command, Abort):
                for seq in command.seqs:
                    if active.pop(seq.seq_id, None) is not None:
                        self.engine.abort(seq)
            elif isinstance(command, Release):
                close = getattr(command.generation.experts, "close", None)
                if close is not None:
                    close()
            elif isinstance(command, Stop):
                for handle, index in active.values():
                    self.engine.abort(handle.seqs[index])
                active.clear()
                return False
        return True
