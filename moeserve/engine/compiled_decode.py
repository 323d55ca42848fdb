"""Compiled CPU decode steps: the whole step through torch.compile (inductor), one compiled step per
batch bucket and span.

In:  a decode step's sequences (at most the largest batch bucket) and their provider; the runner's paged
     KV cache and block tables.
Out: float32 logits [B, V], from the compiled step of the step's (batch bucket, span) key.

Why: on a CPU an eager decode step of a small model costs its per-op overhead (a few hundred ATen
calls, each microseconds of dispatch), not its arithmetic; inductor fuses the elementwise work
into a few generated C++ loops and leaves the matmuls to BLAS and to our kernels (layers/cpu_gemm.py).

How it mirrors the GPU's CUDA graphs (engine/decode_graphs.py): the batch is padded up to a bucket
(padding rows decode token 0 at position 0 of the null block) and every row reads the step's span, so a
step's shapes depend only on (bucket, span). Each key gets a torch.compile region of its own with no
dynamo guards: this module picks the region by the key, which fixes every shape and every Python value
the trace baked in (the model's config, the span's Part, the provider's kind and prediction depth), and
a guard check would cost more than the step on a small model. Inputs (token ids, positions, write slots,
block tables, stacked experts, the KV pools) are read afresh by every call. After a key's first run its
graph is called directly (engine/direct_graph.py), without torch.compile's own call path (~0.1 ms a step).

Experts: a provider that holds a layer stacked is computed inside the compiled step (layers/moe.py
`on_stack`). An offloading provider whose slot pool can hold a step's experts at once (`held_stack`) is
too: one opaque op per MoE layer (`host_expert_slots`: the predictions to prefetch, then `hold`; or, for a
cache kept in C++, `held_expert_slots`, the same without entering Python) returns the slots of the routed experts,
and the step computes them from the pool in place, with the kernel resident experts use. Any other provider
(a cache too small to hold a step's experts, a resident provider with overrides) is reached through the host in
one opaque op per MoE layer (`host_routed_experts`: the predictions, then `fetch` and the experts), exactly as the
eager forward reaches it. The activation between an expert's two GEMMs is an opaque op too
(`gated_activation`, torch's eager kernels): inductor's own code for it rounds differently, and an expert must
come out of the compiled step's stack bit for bit as out of the host path. So the provider sees the same loads
either way, and raw offload equals resident bit for bit whichever path a step takes.

Attention: each layer writes the step's K/V rows into the pools (`kv_write`) and reads every row's blocks in
place through the CPU paged decode kernel (layers/cpu_attention.py, csrc/cpu_attention.cpp), an opaque op with
a C++ twin like the GEMM's; the pools' block views are made inside the graph, so inductor sees no aliased inputs.

Compiling a key takes seconds (more on a loaded machine), so it happens on first use with a progress
line on stderr; inductor's cache directory (`cache_dir`) keeps the generated code across processes.
`enforce_eager` (LLM / --enforce-eager / MOESERVE_ENFORCE_EAGER=1) turns all of this off.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from moeserve import native_ops
from moeserve.codecs.szp_cpu import held_slots_address
from moeserve.engine.decode_graphs import BATCH_BUCKETS, bucket_for, padded_context
from moeserve.engine.direct_graph import CapturingInductor, DirectGraph
from moeserve.engine.sequence import Sequence
from moeserve.experts import ExpertProvider, StackedExperts
from moeserve.kv.context import DecodeContext
from moeserve.layers import cpu_attention, cpu_gemm
from moeserve.layers.moe import held_stack, host_experts
from moeserve.models.decoder import MoeCausalLM

ENFORCE_EAGER_ENV = "MOESERVE_ENFORCE_EAGER"
CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
# read once, before inductor runs: its first compile writes its own default into the environment
_USER_CACHE_DIR = os.environ.get(CACHE_DIR_ENV)


def eager_by_default() -> bool:
    """Whether MOESERVE_ENFORCE_EAGER asks for eager steps when the caller did not choose."""
    return os.environ.get(ENFORCE_EAGER_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """Where inductor keeps generated code: TORCHINDUCTOR_CACHE_DIR when set, else one directory per torch
    version and CPU capability under ~/.cache/moeserve (inductor's own cache key leaves the capability
    out, so code built for AVX-512 would be reused, and fail, under ATEN_CPU_CAPABILITY=avx2)."""
    if _USER_CACHE_DIR:
        return Path(_USER_CACHE_DIR)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeserve" / "inductor"
    return base / f"torch-{torch.__version__}-{torch.backends.cpu.get_cpu_capability().lower()}"


class CompiledDecode:
    def __init__(self, model: MoeCausalLM, runner, progress: bool = True):
        """`runner`: the engine/runner.py ModelRunner whose cache and block tables the steps read."""
        self.model, self.runner, self.progress = model, runner, progress
        self._steps: dict[tuple, Callable] = {}  # (bucket, blocks, provider kind, depth) → its compiled region
        self._blocks = {layer: model.moe_block(layer) for layer in model.moe_layer_ids}
        self.failure: str | None = None  # why compiling failed, after which every step runs eagerly

    def fits(self, seqs: list[Sequence]) -> bool:
        """Whether this decode step can run compiled: its batch fits a bucket (and compiling has not failed)."""
        return self.failure is None and len(seqs) <= BATCH_BUCKETS[-1]

    def decode(self, seqs: list[Sequence], experts: ExpertProvider) -> torch.Tensor:
        """The step's logits [B, V] (call only when `fits`)."""
        runner = self.runner
        batch = len(seqs)
        bucket = bucket_for(batch)
        blocks = runner.decode_blocks(seqs)
        inputs = runner.step_inputs(seqs, bucket)  # [2 + groups, bucket]: token ids, positions, write slots
        tables = runner.block_tables(seqs, bucket, blocks)  # [groups, bucket, blocks]; padding: null block
        ctx = padded_context(runner.cache, inputs, tables, use_kernel=runner.paged_kernel)
        # what the trace bakes in of the provider: its class (where its stacked experts live), which
        # layers it holds stacked, how far ahead it wants predictions, and whether its cache is in C++
        stacked = tuple(experts.stacked(layer) is not None for layer in self._blocks)
        held = tuple(_stack_shape(held_stack(experts, layer, bucket, block.top_k)) for layer, block in self._blocks.items())
        key = (bucket, blocks, type(experts), stacked, held, experts.prediction_depth,
               getattr(experts, "slots_in_cpp", False))
        with host_experts(self._blocks, experts, batch):
            step = self._steps.get(key)
            if step is None:
                return self._compile(key, inputs[0], ctx, experts)[:batch]
            return step(inputs[0], ctx, experts)[:batch]

    def _compile(self, key: tuple, ids: torch.Tensor, ctx: DecodeContext, experts) -> torch.Tensor:
        """Compile `key`'s region by running it once; that run's logits [bucket, V]."""
        bucket, blocks = key[:2]
        # the kernels' C++ ops (built on the very first compile), before the first trace bakes in which ops it calls
        native_ops.load(cpu_gemm.entry_address(), cpu_attention.entry_address(), held_slots_address(), self.progress)
        directory = cache_dir()
        os.environ[CACHE_DIR_ENV] = str(directory)
        span = blocks * self.runner.cache.block_size
        if self.progress:
            print(f"moeserve: compiling the CPU decode step for batches up to {bucket} reading {span} positions "
                  f"(once per shape; generated code cached in {directory})...", file=sys.stderr, flush=True)
        start = time.monotonic()
        # emulate_precision_casts: a bfloat16 model's intermediates rounded where the eager ops round them
        # (fused in float32 otherwise, which parted greedy tokens from the eager step's on tiny bf16 models).
        # inductor's notes on how it lowers an op (e.g. "missing a c-shim implementation, using proxy executor")
        # are for its developers; a failure still reaches the user below
        quiet = logging.getLogger("torch._inductor")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        backend = CapturingInductor({"size_asserts": False, "cpp_wrapper": True, "emulate_precision_casts": True})
        try:
            step = torch.compile(
                self.model,
                backend=backend,
                fullgraph=True,
                dynamic=False,
                isolate_recompiles=True,
                options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "does not support code generation for complex operators"
                logits = step(ids, ctx, experts)
        except Exception as exc:  # noqa: BLE001 - an old torch, a missing compiler, an op inductor cannot lower
            # Slower, never wrong: this step and every later one run eagerly (a failed run wrote at most
            # the K/V this very step writes again).
            self.failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            print(f"moeserve: compiling the CPU decode step failed ({self.failure}); decode steps run eagerly "
                  f"from now on (--enforce-eager skips the attempt).", file=sys.stderr, flush=True)
            return self.model(ids, ctx, experts)
        finally:
            quiet.setLevel(level)
        # later calls skip torch.compile's own call path where its first run shows that changes nothing
        self._steps[key] = DirectGraph.checked(backend, self.model, (ids, ctx, experts), logits) or step
        if self.progress:
            print(f"moeserve: compiled in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
        return logits


def _stack_shape(stack: StackedExperts | None) -> tuple | None:
    """What a trace bakes in of a held stack: its shapes and dtype (its tensors are inputs, read afresh by every
    call; a policy switch may bring slots of another dtype, offload/cache.py slot_dtype)."""
    return None if stack is None else (tuple(stack.gate_up.shape), tuple(stack.down.shape), stack.gate_up.dtype)
