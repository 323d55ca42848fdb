"""A compiled decode step's graph, called without going back through dynamo.

In:  the FX graph dynamo traced from the model's forward (one per compiled key), compiled by inductor; the
     forward's arguments (model, token ids, step context, expert provider) on every later call.
Out: the graph's logits, from the compiled graph called with the tensors dynamo would have gathered.

Why: a compiled step's call through torch.compile costs ~0.1-0.3 ms on top of the graph itself (dynamo's
frame hook, its transformed bytecode gathering ~140 tensors, config and context switches around the
call), as much as a fifth of the embedded model's whole decode step on a CPU. The steps are compiled
without guards (compiled_decode.py picks the region by its key), so all that call does is gather the
graph's inputs and hand them to the compiled graph: `DirectGraph` does just that.

How: inductor is the backend as before (`CapturingInductor` calls `compile_fx`, as torch.compile's own
inductor backend does). For each graph it keeps the compiled callable and the places dynamo read its
inputs from (each placeholder's source, e.g. `L['ctx'].tables`), turned into one Python function of the
forward's arguments. The direct call is used only once checked on the compile's own run: the gathered
tensors must be the very objects dynamo passed, the graph must have one output and the step must have
returned that very tensor, and grad mode must be as dynamo left it. Anything else (a source that is not a
plain attribute or item path, another torch's internals) keeps the torch.compile call.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class _Compiled:
    """One graph inductor compiled, with what its first call was given and returned."""

    call: Callable
    sources: list[str] | None  # each placeholder's source expression in dynamo's `L[...]` notation; None: unknown
    called: bool = False  # whether its first call has run (and been recorded below)
    first_args: list | None = None
    first_outputs: Any = None
    grad_after: bool | None = None


class CapturingInductor:
    """A torch.compile backend: inductor (`compile_fx` with these config patches), remembering each graph it
    compiled and what that graph's first call saw."""

    def __init__(self, config_patches: dict[str, Any]):
        self.config_patches = config_patches
        self.graphs: list[_Compiled] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs, config_patches=self.config_patches)
        record = _Compiled(compiled, _placeholder_sources(gm))
        self.graphs.append(record)

        def first_call_recorded(*args):
            outputs = compiled(*args)
            if not record.called:
                record.called = True
                record.first_args, record.first_outputs = list(args), outputs
                record.grad_after = torch.is_grad_enabled()
            return outputs

        return first_call_recorded


@dataclass
class DirectGraph:
    """Calls one compiled graph with the inputs gathered from the forward's arguments."""

    compiled: Callable
    gather: Callable[[dict, tuple], tuple]  # (the forward's arguments by name, `owners`) → the graph's inputs
    owners: tuple  # what holds each of the model's own tensors (a module's parameter dict, a module)
    parameters: list[str]  # the forward's parameter names, in order

    def __call__(self, *args) -> torch.Tensor:
        return self.compiled(*self.gather(dict(zip(self.parameters, args)), self.owners))[0]

    @classmethod
    def checked(cls, backend: CapturingInductor, model, args: tuple, result) -> "DirectGraph | None":
        """The direct call of the one graph `backend` compiled while the step ran on `args` and returned
        `result`, where that first run shows the direct call would do exactly what the step did; else None."""
        if len(backend.graphs) != 1:
            return None
        record = backend.graphs[0]
        first_args, first_outputs = record.first_args, record.first_outputs
        record.first_args = record.first_outputs = None  # the check below is their only use
        if record.sources is None or first_args is None:
            return None
        if not isinstance(first_outputs, (list, tuple)) or len(first_outputs) != 1 or first_outputs[0] is not result:
            return None
        if record.grad_after != torch.is_grad_enabled():
            return None
        parameters = list(inspect.signature(model.forward).parameters)
        try:
            gather, owners = _gatherer(record.sources, model)
            gathered = gather(dict(zip(parameters, args)), owners)
        except Exception:  # noqa: BLE001 - a source this notation cannot express: keep torch.compile's call
            return None
        if len(gathered) != len(first_args) or any(a is not b for a, b in zip(gathered, first_args)):
            return None
        return cls(record.call, gather, owners, parameters)


_LAST_STEP = re.compile(r"^(.+?)(\.[A-Za-z_][A-Za-z_0-9]*|\[[^\[\]]*\])$")


def _gatherer(sources: list[str], model) -> tuple[Callable[[dict, tuple], tuple], tuple]:
    """One function of (the forward's arguments by name, owners) that returns every source's value, and the
    owners. A path into the model (`L['self']...`) is followed once, up to its last step: per call only that
    step is taken (its owner's parameter dict or attribute), so a tensor the model swaps in is still the
    one read, at a fraction of the cost of the whole path. Paths from the other arguments are taken whole."""
    owners, expressions = [], []
    for source in sources:
        step = _LAST_STEP.match(source) if source.startswith("L['self']") else None
        if step is None:
            expressions.append(source)
            continue
        owners.append(eval("lambda L: " + step.group(1), {"__builtins__": {}})({"self": model}))  # noqa: S307
        expressions.append(f"O[{len(owners) - 1}]{step.group(2)}")
    gather = eval("lambda L, O: (" + "".join(f"{e}, " for e in expressions) + ")", {"__builtins__": {}})  # noqa: S307
    return gather, tuple(owners)


def _placeholder_sources(gm: torch.fx.GraphModule) -> list[str] | None:
    """Each input's source expression, e.g. "L['self']._modules['lm_head']._parameters['weight']"; None where
    one is missing or is not a path from the forward's arguments (a global, a computed value)."""
    sources = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = source.name if source is not None else None
        name = name() if callable(name) else name
        if not isinstance(name, str) or not name.startswith("L["):
            return None
        sources.append(name)
    return sources

