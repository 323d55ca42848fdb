"""A compiled step's graph called directly (engine/direct_graph.py): the same results as the torch.compile call,
and used only where the compile's own run shows that it is.

Toy modules compiled through the same backend as the CPU decode step; each compile builds C++ (a few seconds).
That the engine's steps take the direct call, for resident and offloaded experts, is checked in
test_compiled_decode.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from moeserve.engine.direct_graph import CapturingInductor, DirectGraph

RUN_BESIDE_THE_SESSION = True  # its inductor compiles run on the other core (tests/side_run.py)
PATCHES = {"size_asserts": False, "cpp_wrapper": True}


@dataclass
class Inputs:
    scale: torch.Tensor
    memo: dict = field(default_factory=dict)


class Pure(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8, bias=False)
        self.register_buffer("offset", torch.randn(8))

    def forward(self, x: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        return self.proj(x) * inputs.scale + self.offset


class ScalesItsInput(Pure):
    def forward(self, x: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        inputs.scale.mul_(2)  # an input mutation, which inductor's code does in place for inference graphs
        return self.proj(x) * inputs.scale


class ViewOfItsInput(Pure):
    def forward(self, x: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        return inputs.scale[:4]  # an output aliasing an input: AOT autograd's wrapper remakes the view


class WritesItsInputs(Pure):
    def forward(self, x: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        y = self.proj(x)
        inputs.memo["y"] = y  # a side effect the torch.compile call replays after the graph
        return y * inputs.scale


def _compiled(module: nn.Module, *args):
    backend = CapturingInductor(PATCHES)
    step = torch.compile(module, backend=backend, fullgraph=True, dynamic=False)
    return backend, step, step(*args)


@pytest.fixture(autouse=True)
def _own_inductor_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    with torch.no_grad():  # as the decode step runs
        yield


def test_direct_call_gives_the_compiled_call_s_results_and_reads_what_the_model_holds_now():
    module = Pure().eval()
    x, inputs = torch.randn(3, 8), Inputs(torch.randn(8))
    backend, step, result = _compiled(module, x, inputs)
    direct = DirectGraph.checked(backend, module, (x, inputs), result)
    assert direct is not None and direct.code is not None  # inductor's code itself, past AOT autograd's wrappers
    for _ in range(3):  # fresh inputs each call, as each decode step brings
        x, inputs = torch.randn(3, 8), Inputs(torch.randn(8))
        assert torch.equal(direct(x, inputs), step(x, inputs))
    # a parameter or buffer the model swaps in is the one read (only the path to it is kept)
    module.proj.weight = nn.Parameter(torch.randn(8, 8), requires_grad=False)
    module.offset = torch.randn(8)
    expected = module.proj(x) * inputs.scale + module.offset
    assert torch.allclose(direct(x, inputs), expected, atol=1e-6)


def test_inductor_s_code_is_called_where_it_does_all_the_step_does():
    module = ScalesItsInput().eval()
    x, inputs = torch.randn(3, 8), Inputs(torch.randn(8))
    backend, step, result = _compiled(module, x, inputs)
    direct = DirectGraph.checked(backend, module, (x, inputs), result)
    assert direct is not None and direct.code is not None  # the in-place write runs inside inductor's code
    scale = torch.randn(8)
    direct_inputs, step_inputs = Inputs(scale.clone()), Inputs(scale.clone())
    assert torch.equal(direct(x, direct_inputs), step(x, step_inputs))
    assert torch.equal(direct_inputs.scale, scale * 2) and torch.equal(step_inputs.scale, scale * 2)


def test_the_wrapped_graph_is_called_where_aot_autograd_s_wrapper_does_work():
    module = ViewOfItsInput().eval()
    x, inputs = torch.randn(3, 8), Inputs(torch.randn(8))
    backend, step, result = _compiled(module, x, inputs)
    direct = DirectGraph.checked(backend, module, (x, inputs), result)
    assert direct is not None and direct.code is None  # the wrapper, not inductor's code, makes the view
    inputs = Inputs(torch.randn(8))
    viewed = direct(x, inputs)
    assert torch.equal(viewed, step(x, inputs)) and viewed._base is inputs.scale


def test_no_direct_call_where_the_forward_has_side_effects():
    module = WritesItsInputs().eval()
    x, inputs = torch.randn(3, 8), Inputs(torch.randn(8))
    backend, step, result = _compiled(module, x, inputs)
    assert "y" in inputs.memo  # torch.compile replayed the write...
    assert DirectGraph.checked(backend, module, (x, inputs), result) is None  # ...which a direct call would lose
    step(x, Inputs(torch.randn(8)))  # the torch.compile call stays; it records nothing more
    assert backend.graphs[0].first_args is None and backend.graphs[0].first_outputs is None


def test_no_direct_call_where_a_check_cannot_run():
    module = Pure().eval()
    x, inputs = torch.randn(3, 8), Inputs(torch.randn(8))
    backend, _, result = _compiled(module, x, inputs)
    record = backend.graphs[0]
    first = record.first_args, record.first_outputs  # each check below consumes them
    sources = record.sources
    assert DirectGraph.checked(backend, module, (x, inputs), result.clone()) is None  # not the graph's output
    record.first_args, record.first_outputs, record.sources = *first, None  # e.g. a torch that records no sources
    assert DirectGraph.checked(backend, module, (x, inputs), result) is None
    assert DirectGraph.checked(CapturingInductor(PATCHES), module, (x, inputs), result) is None  # nothing compiled
    record.first_args, record.first_outputs, record.sources = *first, sources
    assert DirectGraph.checked(backend, module, (x, inputs), result) is not None  # the same run, every check met
