"""The sparse MoE block: router → top-k → experts fetched through the expert provider.

In:  hidden states [T, D] of every token in the step (any mix of sequences).
Out: [T, D], the routing-weighted sum of each token's top-k experts (`routed`), and the shared expert
     (`shared`: qwen2_moe's behind a sigmoid gate, DeepSeek's and GLM's ungated). The model adds them
     (models/decoder.py), the routing and the shared expert in one segment, the routed experts between two.

Two ways to reach the experts, one arithmetic:
- On the device. When the provider holds the layer's experts stacked ([S, 2I, D] and [S, D, I] with
  an expert → slot map on the device, `ExpertProvider.stacked`), and the step is a GPU step of at most
  GROUPED_GEMM_MAX_TOKENS tokens (every decode step a CUDA graph holds) or runs under torch.compile,
  the routed (token, expert) pairs go through two grouped GEMMs
  (layers/grouped_gemm.py) indexed by device-side ids: no host sync, so the step can be captured.
- Through the host. Otherwise the block reads the routing on the host and asks the provider for
  each used expert (`fetch`): how an offloading provider learns what to load, and the cheapest path
  on a CPU, where reading the routing costs nothing.
Whichever path a step takes, the step's token count and the device's grouped GEMM kernel alone decide
the matmul (`expert_linear`): a step of at most GROUPED_GEMM_MAX_TOKENS tokens on a device with a kernel
(a GPU with triton; a CPU in float32 or bfloat16 with the C++ extension built) runs it, whose rows do not
depend on which other rows share a call, one expert at a time on the host path as every pair at once on
the device path; F.linear otherwise. Both paths apply the same activation (a compiled CPU step calls torch's
eager kernels for it as one opaque op, layers/mlp.py, where inductor's own code would round differently) and
the same weighted sum over the K slots in float32, so an offloaded expert equals a resident one bit for bit.
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moeserve import native_ops
from moeserve.alignment import aligned_empty, rows_per_alignment
from moeserve.config import ModelConfig
from moeserve.experts import ExpertProvider, ExpertWeights, StackedExperts
from moeserve.layers.grouped_gemm import (
    GROUPED_GEMM_MAX_TOKENS,
    align_pairs,
    grouped_gemm,
    grouped_linear,
    has_kernel,
    runs_kernel,
)
from moeserve.layers.linear import Linear
from moeserve.layers.mlp import ACTIVATIONS, GatedMLP
from moeserve.layers.routing import build_router

# Legend: T = tokens in the step, D = hidden size, E = routed experts, K = experts per token.

# GROUPED_GEMM_MAX_TOKENS (layers/grouped_gemm.py): steps of at most this many tokens (every decode step a
# CUDA graph holds, short extends) compute experts with the grouped GEMM's kernel; longer ones (prefill) with
# torch's matmuls, expert by expert through the host. Without triton every GPU step takes the host path with
# F.linear (and no decode step is captured); so does every CPU step in float16 or without the C++ extension.


class MoeBlock(nn.Module):
    """The router comes from config.router (layers/routing.py); families change the router's
    checkpoint name (`router_attr`) and the expert math (`_activate`, `_finish`) by subclassing, see
    models/gpt_oss.py; every path's experts go through those two."""

    router_attr = "gate"  # attribute (and checkpoint name) of the router

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.top_k = config.top_k
        self.num_experts = config.num_experts
        self.act, self.act_name = ACTIVATIONS[config.hidden_act], config.hidden_act
        setattr(self, self.router_attr, build_router(config))
        self.shared_expert = self.shared_experts = None
        if config.shared_expert_intermediate_size:
            shared = GatedMLP(config.hidden_size, config.shared_expert_intermediate_size, config.hidden_act, config.mlp_bias)
            if config.shared_expert_gated:
                self.shared_expert = shared
                self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)
            else:
                self.shared_experts = shared

    @property
    def router_module(self) -> nn.Module:
        """The router (layers/routing.py), under whichever name the checkpoint gives it."""
        return getattr(self, self.router_attr)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] → (weights [T, K], expert ids [T, K])."""
        return self.router_module(x)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's output [T, D] (qwen2_moe's gated), or None for families without one."""
        if self.shared_expert is not None:
            return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.shared_experts is not None:
            return self.shared_experts(x)
        return None

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertProvider):
        """x [T, D] and its routing (weights, expert ids [T, K]) → the weighted sum of the routed experts [T, D]."""
        T = x.shape[0]
        stacked = experts.stacked(self.layer_id)
        # The step's token count (and the device's kernel) picks the arithmetic, so every provider computes a
        # step alike.
        grouped = T <= GROUPED_GEMM_MAX_TOKENS and has_kernel(x.device, x.dtype)
        # Eager CPU steps stay on the host path: reading the routing costs nothing there, and resident and
        # offloaded providers then run a step through the very same calls.
        if stacked is not None and ((grouped and runs_kernel(x.device)) or torch.compiler.is_compiling()):
            return self.on_stack(x, weights, ids, stacked)
        if T == 1:
            return self._single_token(x, weights, ids, experts, grouped)
        return self._many_tokens(x, weights, ids, experts, grouped)

    def _activate(self, gate: torch.Tensor, up: torch.Tensor, expert: int | torch.Tensor) -> torch.Tensor:
        """gate, up [n, I] of rows routed to `expert` (one id, or an id per row [n]) → [n, I]."""
        if gate.is_cpu and torch.compiler.is_compiling():
            # torch's eager kernels as one opaque op (layers/mlp.py): inductor's own code for the activation rounds
            # differently, and an expert computed from a stack inside the step must equal one computed through
            # `host_routed_experts` bit for bit (raw offload against resident)
            return native_ops.ops().gated_activation(gate, up, self.act_name)
        return self.act(gate) * up

    def _finish(self, y: torch.Tensor, expert: int | torch.Tensor) -> torch.Tensor:
        """The down projection's output [n, D] → the expert's output (families with biases add them)."""
        return y

    def _expert(self, h: torch.Tensor, w: ExpertWeights, expert_id: int, grouped: bool) -> torch.Tensor:
        """h [n, D] → [n, D]; `grouped`: each matmul through the grouped GEMM (see expert_linear)."""
        return self._finish(self._project(h, w, expert_id, grouped), expert_id)

    def _project(
        self, h: torch.Tensor, w: ExpertWeights, expert_id: int, grouped: bool, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h [n, D] → the down projection's output [n, D] (into `out` when given), before `_finish`."""
        gate, up = gate_and_up(h, w, grouped)
        return expert_linear(self._activate(gate, up, expert_id), w.down, grouped, out)

    def on_stack(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, stacked: StackedExperts,
                   slots: torch.Tensor | None = None):
        """Every (token, slot) pair through two grouped GEMMs over the stacked experts, ids never leaving the device.
        `slots` [T, K]: the stack's row of each pair's expert where the stack does not map ids to rows itself
        (the expert cache's slots, `host_expert_slots`)."""
        T, D = x.shape
        pairs = T * self.top_k
        expert_of = ids.flatten()  # [P]: pair p is token p // K, slot p % K
        slot_of = stacked.slot_of[expert_of] if slots is None else slots.flatten()  # [P]
        token_of = torch.arange(T, device=x.device).repeat_interleave(self.top_k)  # [P]
        # the pairs grouped by slot once for both GEMMs (only the GPU kernel uses the grouping)
        grouping = align_pairs(slot_of, stacked.gate_up.shape[0]) if runs_kernel(x.device) else None
        gate_up = grouped_gemm(x, token_of, slot_of, stacked.gate_up, alignment=grouping)  # [P, 2I]
        gate, up = gate_up.chunk(2, dim=-1)  # [P, I] each
        h = self._activate(gate, up, expert_of)  # [P, I]
        down = grouped_gemm(h, torch.arange(pairs, device=x.device), slot_of, stacked.down, alignment=grouping)
        y = self._finish(down, expert_of)  # [P, D]
        per_pair = (y * weights.flatten()[:, None]).to(x.dtype)  # [P, D], as the host paths weight each expert
        return _sum_slots(per_pair.view(T, self.top_k, D).unbind(dim=1))  # [T, D]

    def _single_token(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertProvider,
                      grouped: bool):
        """Decode at batch 1: no grouping needed, just the K experts of one token."""
        chosen = ids[0].tolist()  # K distinct expert ids, in slot order
        per_slot: list[torch.Tensor | None] = [None] * self.top_k
        for expert_id, w in experts.fetch(self.layer_id, sorted(chosen)):
            slot = chosen.index(expert_id)
            # weights[:, slot, None] is [1, 1], not a 0-d tensor: a 0-d routing weight would be rounded to
            # a bfloat16 expert output's dtype first; like this it multiplies in float32, as on the other paths
            per_slot[slot] = (self._expert(x, w, expert_id, grouped) * weights[:, slot, None]).to(x.dtype)  # [1, D]
        return _sum_slots(per_slot)  # [1, D]

    def _many_tokens(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertProvider,
                     grouped: bool):
        """Every (token, slot) pair, expert by expert. Per expert only its matmuls and activation run (on
        a CPU each op over a few hundred rows costs a wake-up of the thread team as much as its arithmetic:
        see docs/kv-cache.md); the gather of its rows, the down projection's bias, the routing weights and
        the return to token order run once for the layer, each one op over every pair, elementwise alike."""
        T, D = x.shape
        # Group the T*K (token, slot) pairs by expert with one sort, so the step syncs with the
        # host once (for the counts) instead of once per expert.
        flat_ids = ids.flatten()  # [T*K]
        order = torch.argsort(flat_ids, stable=True)  # [T*K] pair index, grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        used = [e for e, c in enumerate(counts) if c]
        starts = dict(zip(used, itertools.accumulate([0] + [counts[e] for e in used])))
        token_of = order // self.top_k  # [T*K] token index of each sorted pair
        rows, at = _gather_rows(x, token_of, flat_ids[order], used, counts, starts)  # each expert's rows aligned

        # Each (token, slot) pair gets its own row, summed over K at the end in a fixed order, so
        # the result does not depend on the order in which the provider hands out experts.
        y = x.new_empty(order.shape[0], D)  # [T*K, D]: the sorted pairs' outputs, each expert's written in place
        for expert_id, w in experts.fetch(self.layer_id, used):
            start, n = starts[expert_id], counts[expert_id]
            self._project(rows[at[expert_id] : at[expert_id] + n], w, expert_id, grouped, y[start : start + n])
        y = self._finish(y, flat_ids[order])
        per_sorted = (y * weights.flatten()[order][:, None]).to(x.dtype)  # [T*K, D]
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(order.shape[0], device=order.device)
        per_pair = per_sorted[unsort]  # [T*K, D], indexed like flat_ids
        return _sum_slots(per_pair.view(T, self.top_k, D).unbind(dim=1))  # [T, D]


def prefetch(experts: ExpertProvider, predictions: list[tuple[int, torch.Tensor]], tokens: int) -> None:
    """Hand the provider each prediction ([T', K] ids, of which the first `tokens` rows are real: a
    captured step pads its batch) as the sorted set of experts it names; one device→host copy for all."""
    if not predictions:
        return
    host = torch.stack([ids[:tokens] for _, ids in predictions]).tolist()  # [predictions][tokens][K]
    for (layer, _), rows in zip(predictions, host):
        experts.prefetch(layer, sorted({expert for row in rows for expert in row}))


class _HostScope(threading.local):
    """The MoE blocks and provider a compiled step's `host_routed_experts` calls reach (see `host_experts`)."""

    blocks: dict[int, MoeBlock] | None = None
    experts: ExpertProvider | None = None
    tokens: int = 0


_host_scope = _HostScope()


@contextmanager
def host_experts(blocks: dict[int, MoeBlock], experts: ExpertProvider, tokens: int) -> Iterator[None]:
    """Within: a compiled step's routed experts reach `experts` through the host (engine/compiled_decode.py).
    `tokens`: the step's real rows (the rest pad a batch bucket; no expert is loaded for them). On the way
    out the experts the step held (`host_expert_slots`) are released."""
    _host_scope.blocks, _host_scope.experts, _host_scope.tokens = blocks, experts, tokens
    if hasattr(experts, "begin_step"):
        experts.begin_step(tokens)
    try:
        yield
    finally:
        _host_scope.blocks = _host_scope.experts = None
        if hasattr(experts, "release"):
            experts.release()


def held_stack(experts: ExpertProvider, layer: int, tokens: int, top_k: int) -> StackedExperts | None:
    """The stack a compiled step of `tokens` rows computes MoE layer `layer` from, through `host_expert_slots`,
    where the provider offers one (an offloading provider's slot pool, see OffloadedExpertProvider.held_stack);
    None: the layer goes through `host_routed_experts`."""
    if not hasattr(experts, "held_stack"):
        return None
    return experts.held_stack(layer, tokens * top_k)


def expert_slots(experts: ExpertProvider, ids: torch.Tensor, layer: int, predicted: list[torch.Tensor],
                 predicted_layers: list[int]) -> torch.Tensor:
    """The slots [T, K] of `held_stack`'s rows for ids [T, K] of MoE layer `layer`, in a compiled step, after handing
    the provider the later layers' predictions (`predicted` [T, K] ids of `predicted_layers`): through the
    provider's C++ cache where it has one (`slots_in_cpp`; C++ op moeserve_native::held_expert_slots, no Python on
    the way), else through `host_expert_slots`."""
    if getattr(experts, "slots_in_cpp", False) and native_ops.loaded():
        return torch.ops.moeserve_native.held_expert_slots(ids, layer, predicted, predicted_layers)
    return host_expert_slots(ids, layer, predicted, predicted_layers)


def _predicted_in_scope(op: str, predicted: list[torch.Tensor], predicted_layers: list[int]) -> _HostScope:
    """What a host op first does: find the step's scope (`host_experts`), and hand its provider the later
    layers' predictions (`predicted` [T, K] ids of `predicted_layers`)."""
    scope = _host_scope
    if scope.blocks is None:
        raise RuntimeError(f"{op} ran outside host_experts(...): no provider to fetch experts from")
    prefetch(scope.experts, list(zip(predicted_layers, predicted)), scope.tokens)
    return scope


def _host_expert_slots(
    ids: torch.Tensor, layer: int, predicted: list[torch.Tensor], predicted_layers: list[int]
) -> torch.Tensor:
    """The slots [T, K] of `held_stack`'s rows holding the experts ids [T, K] of MoE layer `layer` route to,
    for a compiled step to compute the layer there: first the later layers' predictions go to the provider
    (as in `host_routed_experts`), then the provider loads the real rows' experts and holds them until the
    step ends. Padding rows get the first held slot (their outputs feed padding rows only)."""
    scope = _predicted_in_scope("host_expert_slots", predicted, predicted_layers)
    tokens = scope.tokens
    routed = ids[:tokens].tolist()  # [tokens][K]
    wanted = sorted({expert for row in routed for expert in row})
    slot_of = dict(zip(wanted, scope.experts.hold(layer, wanted)))
    padding = [[slot_of[wanted[0]]] * ids.shape[1]] * (ids.shape[0] - tokens)
    return torch.tensor([[slot_of[expert] for expert in row] for row in routed] + padding, dtype=torch.long)


def _host_routed_experts(
    h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layer: int, predicted: list[torch.Tensor],
    predicted_layers: list[int],
) -> torch.Tensor:
    """MoE layer `layer`'s routed experts [T, D] of h [T, D] routed (weights, ids [T, K]), computed through
    the host from a compiled step, exactly as the eager forward computes them between two segments:
    first the later layers' predictions (`predicted` [T, K] ids of `predicted_layers`) go to the provider,
    then `routed` runs on the real rows. The opaque op keeps the host's reads (which experts to load) out
    of the compiled graph, so one compiled step serves resident and offloaded providers alike."""
    scope = _predicted_in_scope("host_routed_experts", predicted, predicted_layers)
    tokens = scope.tokens
    out = torch.zeros_like(h)  # padding rows: zeros (they feed padding rows only)
    out[:tokens] = scope.blocks[layer].routed(h[:tokens], weights[:tokens], ids[:tokens], scope.experts)
    return out


# Plain kernels (no autograd or custom_op wrappers, which cost ~15 us a call): a compiled step calls one of
# them per MoE layer.
_library = torch.library.Library("moeserve", "FRAGMENT")
_library.define("host_expert_slots(Tensor ids, int layer, Tensor[] predicted, int[] predicted_layers) -> Tensor")
_library.define("host_routed_experts(Tensor h, Tensor weights, Tensor ids, int layer, Tensor[] predicted, "
                "int[] predicted_layers) -> Tensor")
for _key in ("CPU", "CUDA"):
    _library.impl("host_expert_slots", _host_expert_slots, _key)
    _library.impl("host_routed_experts", _host_routed_experts, _key)
torch.library.register_fake(
    "moeserve::host_expert_slots", lambda ids, *args: torch.empty_like(ids, dtype=torch.long), lib=_library
)
torch.library.register_fake("moeserve::host_routed_experts", lambda h, *args: torch.empty_like(h), lib=_library)
host_expert_slots = torch.ops.moeserve.host_expert_slots
host_routed_experts = torch.ops.moeserve.host_routed_experts


def gate_and_up(h: torch.Tensor, w: ExpertWeights, grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """h [n, D] → the expert's gate and up projections [n, I], one matmul when they are fused."""
    if w.gate_up is not None:
        gate, up = expert_linear(h, w.gate_up, grouped).chunk(2, dim=-1)  # [n, 2I] → [n, I] twice
        return gate, up
    return expert_linear(h, w.gate, grouped), expert_linear(h, w.up, grouped)  # grouped: the fused product's rows


def expert_linear(
    h: torch.Tensor, weight: torch.Tensor, grouped: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """h [n, Din] @ weight [Dout, Din].T for one expert. `grouped` (a step of few tokens on a device with a
    grouped GEMM kernel): through that kernel (grouped_gemm.grouped_linear), so each row comes out bit for
    bit as it would among a whole layer's pairs on the device path; otherwise F.linear (cuBLAS and MKL read
    a big step's weights once, the kernels once per few rows). `out` [n, Dout]: where the product goes (the
    same matmul as F.linear's, writing there). `weight` may be narrower than h (an expert cache's bfloat16
    slot under float32 compute, offload/cache.py): the kernel widens it itself, F.linear gets a widened copy."""
    if grouped:
        return grouped_linear(h, weight) if out is None else out.copy_(grouped_linear(h, weight))
    weight = in_compute_dtype(weight, h.dtype)
    return F.linear(h, weight) if out is None else torch.mm(h, weight.t(), out=out)


def in_compute_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [N, Kdim] in `dtype`: itself, or widened (exactly: a bfloat16 slot under float32 compute) into a
    contiguous copy that starts 64-byte aligned like the resident matrix it equals (alignment.py), so a BLAS
    whose rounding depends on an operand's address rounds it alike."""
    if weight.dtype == dtype:
        return weight
    return aligned_empty(tuple(weight.shape), dtype, weight.device).copy_(weight)


def _gather_rows(
    x: torch.Tensor, token_of: torch.Tensor, sorted_ids: torch.Tensor, used: list[int], counts: list[int],
    starts: dict[int, int],
) -> tuple[torch.Tensor, dict[int, int]]:
    """The rows of x [T, D] the sorted pairs read (token_of [P]), gathered in one op, and where each used
    expert's rows start there. Each expert's rows start on a 64-byte boundary (alignment.py), as a tensor
    of its own would: a matmul's rounding may depend on where its operand starts. Where a row spans whole
    alignments (most hidden sizes) the rows are simply consecutive; otherwise experts are spaced apart."""
    step = rows_per_alignment(x.shape[1], x.dtype)
    if step == 1:
        at, index = starts, token_of
    else:
        at, row = {}, 0
        for e in used:
            at[e] = row
            row += -(-counts[e] // step) * step
        shift = [0] * len(counts)  # per expert: how far its rows move down
        for e in used:
            shift[e] = at[e] - starts[e]
        moved = torch.arange(token_of.shape[0], device=x.device) + torch.tensor(shift, device=x.device)[sorted_ids]
        index = token_of.new_zeros(row)  # padding rows read token 0, and nothing reads them
        index[moved] = token_of
    rows = aligned_empty((index.shape[0], x.shape[1]), x.dtype, x.device)
    return torch.index_select(x, 0, index, out=rows), at


def _sum_slots(per_slot) -> torch.Tensor:
    """Sum over the K slots, left to right: both paths add in this one order, so a token's output
    does not depend on the batch it was computed in."""
    out = per_slot[0]
    for y in per_slot[1:]:
        out = out + y
    return out
