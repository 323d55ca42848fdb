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

Deeper still: AOT autograd's runtime wrappers around inductor's code cost another ~65 us a call on the
embedded model (median step call 554 -> 489 us at 1 thread: their prologue, input and output bookkeeping).
Inductor's own compiled graph (its `CompiledFxGraph`, whose `current_callable` runs the generated C++) is
caught where inductor finishes every graph it hands back, fresh or from either cache (`post_compile`). Where
its first run was handed exactly the tensors dynamo passed, in order, and returned exactly the step's result
as its one output, those wrappers did nothing the direct call would miss (an RNG seed, an effect token, an
output aliasing an input would each show as another input or output; an inference graph's input mutations
run inside inductor's code), so the direct call calls it. Otherwise it calls the wrapped graph as above.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class _Inner:
    """Inductor's own compiled graph inside AOT autograd's wrappers, with what its first call was given and returned."""

    code: Any  # the OutputCode: current_callable(list of inputs) runs the generated code
    first_args: list | None = None
    first_outputs: Any = None


@dataclass
class _Compiled:
    """One graph inductor compiled, with what its first call was given and returned."""

    call: Callable
    sources: list[str] | None  # each placeholder's source expression in dynamo's `L[...]` notation; None: unknown
    called: bool = False  # whether its first call has run (and been recorded below)
    first_args: list | None = None
    first_outputs: Any = None
    grad_after: bool | None = None
    inner: list[_Inner] = field(default_factory=list)  # every inner graph inductor compiled for it


class CapturingInductor:
    """A torch.compile backend: inductor (`compile_fx` with these config patches), remembering each graph it
    compiled and what that graph's first call saw, down to inductor's own compiled code."""

    def __init__(self, config_patches: dict[str, Any]):
        self.config_patches = config_patches
        self.graphs: list[_Compiled] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        inner: list[_Inner] = []
        try:
            from torch._inductor.output_code import CompiledFxGraph
        except ImportError:  # another torch's internals: no direct call into inductor's code
            compiled = compile_fx(gm, example_inputs, config_patches=self.config_patches)
        else:
            # Inductor's post_compile runs on every compiled graph it hands back, freshly generated or loaded
            # from either cache (AOT autograd's or inductor's own), which inner_compile alone would miss.
            post_compile = CompiledFxGraph.post_compile

            def post_compile_recorded(code, *args, **kwargs):
                post_compile(code, *args, **kwargs)
                inner.append(_record_first_call(code))

            CompiledFxGraph.post_compile = post_compile_recorded
            try:
                compiled = compile_fx(gm, example_inputs, config_patches=self.config_patches)
            finally:
                CompiledFxGraph.post_compile = post_compile
        record = _Compiled(compiled, _placeholder_sources(gm), inner=inner)
        self.graphs.append(record)

        def first_call_recorded(*args):
            outputs = compiled(*args)
            if not record.called:
                record.called = True
                record.first_args, record.first_outputs = list(args), outputs
                record.grad_after = torch.is_grad_enabled()
            return outputs

        return first_call_recorded


def _record_first_call(code) -> _Inner:
    """`code` (an OutputCode) made to record what its first run of the generated code is given and returns."""
    entry = _Inner(code)
    run = getattr(code, "current_callable", None)
    if not callable(run):
        return entry  # another torch's internals: no direct call into it

    def first_call(inputs):
        entry.first_args = list(inputs)  # the call empties the list it is given
        entry.first_outputs = run(inputs)
        code.current_callable = run  # later calls run the generated code directly again
        return entry.first_outputs

    code.current_callable = first_call
    return entry


@dataclass
class DirectGraph:
    """Calls one compiled graph with the inputs gathered from the forward's arguments: inductor's code itself
    (`code`), or, where that is not known to be safe, the graph with AOT autograd's wrappers (`compiled`)."""

    compiled: Callable
    gather: Callable[[dict, tuple], tuple]  # (the forward's arguments by name, `owners`) → the graph's inputs
    owners: tuple  # what holds each of the model's own tensors (a module's parameter dict, a module)
    parameters: list[str]  # the forward's parameter names, in order
    code: Any = None  # inductor's OutputCode, called directly when set

    def __call__(self, *args) -> torch.Tensor:
        inputs = self.gather(dict(zip(self.parameters, args)), self.owners)
        if self.code is not None:
            return self.code.current_callable(list(inputs))[0]
        return self.compiled(*inputs)[0]

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
        return cls(record.call, gather, owners, parameters, _inner_code(record, gathered, result))


def _inner_code(record: _Compiled, gathered: tuple, result) -> Any:
    """Inductor's code of `record` where its first run shows that AOT autograd's wrappers around it did nothing:
    it was given the very tensors gathered, in order, and returned the step's result as its one output."""
    if len(record.inner) != 1:
        return None
    inner = record.inner[0]
    args, outputs = inner.first_args, inner.first_outputs
    inner.first_args = inner.first_outputs = None  # the check below is their only use
    if args is None or len(args) != len(gathered) or any(a is not b for a, b in zip(args, gathered)):
        return None
    if not isinstance(outputs, (list, tuple)) or len(outputs) != 1 or outputs[0] is not result:
        return None
    return inner.code


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

