"""CUDA graphs for decode steps: the whole step when its experts are resident and stacked, otherwise
every segment between the routed experts (models/decoder.py `segment`), with the experts run eagerly.

In:  a decode step's sequences (rows 0..B-1 of the KV cache, every running row) and their provider.
Out: float32 logits [B, V], from replaying graphs captured for the step's shape bucket.

A GPU runs a small-batch decode step far faster than the host can launch its few hundred kernels one
by one. So, as vLLM does, each shape bucket's step is captured once and replayed: batch sizes are padded
up to a bucket (1, 2, 4, 8, 16, 32), and the positions a row reads are the step's span (kv/context.py),
a power of two. The graph reads its inputs from static buffers (token ids, positions, write slots, block tables) that
each step fills with host→device copies; padded entries decode token 0 at position 0 of the null block
(kv/blocks.py), which nothing reads unmasked. What a graph bakes in, and when it is recaptured:
  - the KV pool: allocated once and never moved, so never;
  - the provider's stacked experts: whole-step graphs are kept per provider, and dropped when it is freed;
  - the rotary table: reserved for the whole context before the first capture.
An offloading provider must see each MoE layer's routing on the host to load its experts, so its steps
replay a chain of segment graphs (kept per prediction depth, rounded down to a power of two: each
segment also predicts the next layers' experts for the provider's prefetch) with the routed experts run eagerly between them, exactly as the
eager forward runs them: only the host's launches of everything else are saved.
Larger batches run eagerly; so does every step with `enforce_eager`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from moeserve.engine.sequence import Sequence
from moeserve.experts import ExpertProvider
from moeserve.kv.context import DecodeContext, Part
from moeserve.layers.moe import prefetch
from moeserve.models.decoder import MoeCausalLM, Segment

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


def bucket_for(batch: int) -> int:
    """The smallest batch bucket that holds `batch` rows (at most BATCH_BUCKETS[-1])."""
    return next(b for b in BATCH_BUCKETS if b >= batch)


def padded_context(cache, inputs: torch.Tensor, tables: torch.Tensor, use_kernel: bool) -> DecodeContext:
    """The context of a padded decode step: inputs [2 + groups, bucket] (token ids, positions, write slots)
    and tables [groups, bucket, blocks], every row read over the whole span (one Part)."""
    bucket, blocks = tables.shape[1], tables.shape[2]
    return DecodeContext(cache, inputs[1], inputs[2:], tables, (Part(0, bucket, blocks),), use_kernel=use_kernel)


class Graph(Protocol):
    def replay(self) -> None: ...


class Capturer(Protocol):
    """How steps are captured, and the host buffers and events that go with replays: CUDA's below; the
    tests' stand-in replays eagerly on a CPU, which checks everything here but the capture itself."""

    def capture(self, step: Callable[[], object]) -> tuple[Graph, object]: ...

    def staging(self, like: torch.Tensor) -> torch.Tensor: ...

    def event(self): ...


class CudaCapturer:
    """CUDA graphs, all in one memory pool (replays never overlap, so they can share it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, step: Callable[[], object]) -> tuple[Graph, object]:
        """The graph of `step` and its output (tensors), which every replay rewrites."""
        # One eager run of this very step on a side stream first: it compiles the Triton kernels and
        # lets the caching allocator and the attention backends settle, none of which may happen
        # during capture. It writes the K/V the replay writes again: the real rows' new positions,
        # and position 0 of the free rows the padding uses.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: an offloading variant's fill threads may use the device meanwhile
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = step()
        return graph, output

    def staging(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(like).pin_memory()

    def event(self) -> torch.cuda.Event:
        return torch.cuda.Event()


@dataclass
class CapturedStep:
    graphs: list[Graph]  # the whole step, or one per segment
    # Every tensor the graph reads that was made outside it must live as long as the graph: the replay
    # reads these addresses, and a freed block would be handed to the next allocation.
    inputs: torch.Tensor  # [2 + groups, bucket] long, static: token ids, positions, write slots
    tables: torch.Tensor  # [groups, bucket, blocks] long, static: block tables
    logits: torch.Tensor  # [bucket, V] float32, static output
    staging: tuple[torch.Tensor, torch.Tensor]  # pinned host memory: the next step's inputs and tables
    copied: torch.cuda.Event  # recorded after the last copy out of `staging`
    # a chain of segments: the output of each but the last, and the static input of each but the first
    # (the routed experts of the MoE layer before it, [bucket, D])
    segments: list[Segment]
    routed: list[torch.Tensor]


class DecodeGraphs:
    def __init__(self, model: MoeCausalLM, runner, device: torch.device, capturer: Capturer | None = None):
        """`runner`: the engine/runner.py ModelRunner whose cache and block tables the steps read."""
        self.model, self.runner, self.device = model, runner, device
        self.capturer = capturer or CudaCapturer(device)
        self._graphs: dict[tuple, CapturedStep] = {}  # (bucket, blocks, provider id) or (bucket, blocks, None, depth)
        self._watched: set[int] = set()  # providers whose graphs go when they do
        self._rope_ready = False

    def fits(self, seqs: list[Sequence]) -> bool:
        """Whether this decode step can replay graphs."""
        return len(seqs) <= BATCH_BUCKETS[-1]

    def decode(self, seqs: list[Sequence], experts: ExpertProvider) -> torch.Tensor:
        """The step's logits [B, V] (call only when `fits`)."""
        batch = len(seqs)
        bucket = bucket_for(batch)
        blocks = self.runner.decode_blocks(seqs)
        host = self.runner.step_inputs(seqs, bucket)  # [2 + groups, bucket]: token ids, positions, write slots
        tables = self.runner.block_tables(seqs, bucket, blocks)  # [groups, bucket, blocks]; padding: null block
        whole = all(experts.stacked(layer) is not None for layer in self.model.moe_layer_ids)
        # a whole step bakes in the provider's experts; a chain only the prediction depth its segments make
        # The depth changes with the batch's routing width; a power of two below it keeps the chains few
        # (a depth changes which guesses the provider hears of, never a number the step computes).
        depth = experts.prediction_depth
        depth = depth and 1 << (depth.bit_length() - 1)
        key = (bucket, blocks, id(experts)) if whole else (bucket, blocks, None, depth)
        step = self._graphs.get(key)
        if step is None:
            if whole:
                step = self._graphs[key] = self._capture_whole(bucket, experts, host, tables)
                self._watch(experts)
            else:
                step = self._graphs[key] = self._capture_chain(bucket, depth, host, tables)
        step.copied.synchronize()  # normally long done: the previous step's tokens were read on the host
        for staging, static, now in zip(step.staging, (step.inputs, step.tables), (host, tables)):
            staging.copy_(now)
            static.copy_(staging, non_blocking=True)
        step.copied.record()
        step.graphs[0].replay()
        with torch.inference_mode():
            for layer, done, routed, graph in zip(self.model.moe_layer_ids, step.segments, step.routed, step.graphs[1:]):
                # as the eager forward does between segments, on the real rows only (no expert is loaded for padding)
                prefetch(experts, done.predictions, batch)
                block = self.model.moe_block(layer)
                routed[:batch].copy_(block.routed(done.h[:batch], done.weights[:batch], done.ids[:batch], experts))
                graph.replay()
        return step.logits[:batch]

    def _watch(self, experts: ExpertProvider) -> None:
        """Drop a provider's graphs once it is gone (a retired policy's experts must be freed, and no graph
        may replay over freed weights); no reference is kept to it here."""
        if id(experts) not in self._watched:
            self._watched.add(id(experts))
            weakref.finalize(experts, self._forget, id(experts))

    def _forget(self, provider_id: int) -> None:
        self._watched.discard(provider_id)
        for key in [key for key in self._graphs if key[2] == provider_id]:
            del self._graphs[key]

    def _static_inputs(self, host: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._rope_ready:
            # a graph reads the table where it is at capture: it must never be rebuilt afterwards
            self.model.rotary.reserve(self.runner.max_len, self.device)
            self._rope_ready = True
        # this step's inputs: the capturer's warm-up run writes real K/V at the step's positions
        return host.to(self.device), tables.to(self.device)  # [2 + groups, bucket], [groups, bucket, blocks]

    def _context(self, inputs: torch.Tensor, tables: torch.Tensor) -> DecodeContext:
        return padded_context(self.runner.cache, inputs, tables, self.runner.paged_kernel)

    def _staging(self, host: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.capturer.staging(host), self.capturer.staging(tables)

    def _capture_whole(self, bucket: int, experts: ExpertProvider, host: torch.Tensor, tables: torch.Tensor) -> CapturedStep:
        inputs, static_tables = self._static_inputs(host, tables)
        provider = weakref.ref(experts)  # a capturer may keep `step`; the provider must still be free to go

        def step() -> torch.Tensor:
            return self.model(inputs[0], self._context(inputs, static_tables), provider())  # [bucket, V]

        graph, logits = self.capturer.capture(step)
        return CapturedStep([graph], inputs, static_tables, logits, self._staging(host, tables), self.capturer.event(), [], [])

    def _capture_chain(self, bucket: int, depth: int, host: torch.Tensor, tables: torch.Tensor) -> CapturedStep:
        inputs, static_tables = self._static_inputs(host, tables)
        config = self.model.config
        routed = [
            # padding rows keep what an earlier, larger batch left: they feed padding rows only
            torch.zeros(bucket, config.hidden_size, dtype=config.dtype, device=self.device)
            for _ in self.model.moe_layer_ids
        ]
        graphs, segments = [], []
        for index in range(len(routed) + 1):
            previous = segments[-1] if segments else None

            def step(index=index, previous=previous) -> Segment:
                # Its own context per segment: a mask cached in one graph's memory must not be read by another.
                ctx = self._context(inputs, static_tables)
                with torch.inference_mode():
                    moe_out = routed[index - 1] if index else None
                    return self.model.segment(index, inputs[0], ctx, depth, previous, moe_out)

            graph, done = self.capturer.capture(step)
            graphs.append(graph)
            segments.append(done)
        last = segments.pop()
        return CapturedStep(graphs, inputs, static_tables, last.x, self._staging(host, tables), self.capturer.event(),
                            segments, routed)
