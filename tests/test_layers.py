"""Imports only point down: no module of the package imports from a layer above its own (docs/layers.md).

Walks every `import` statement of every module with `ast` (lazy imports inside functions and
TYPE_CHECKING blocks included), resolves each to a moeserve module, and compares layers.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moeserve"

# Bottom to top. A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("moeserve.errors", "moeserve.devices", "moeserve.sizes", "moeserve.alignment", "moeserve.huge_pages",
                    "moeserve.native_ops", "moeserve.paths")),
    ("codecs", ("moeserve.codecs", "moeserve._szp_cpu")),
    ("checkpoint", ("moeserve.config", "moeserve.config_families", "moeserve.checkpoint", "moeserve.tokenizer",
                    "moeserve.assets")),
    ("step interfaces", ("moeserve.experts", "moeserve.kv")),
    ("layers", ("moeserve.layers", "moeserve._cpu_gemm")),
    ("models", ("moeserve.models",)),
    ("engine", ("moeserve.engine",)),
    ("loader", ("moeserve.loader",)),
    ("offload", ("moeserve.offload",)),
    ("api", ("moeserve.llm", "moeserve")),
    ("eval", ("moeserve.eval",)),
    ("server", ("moeserve.server",)),
    ("cli", ("moeserve.cli",)),
]
RANK = {prefix: rank for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in RANK:
            return RANK[prefix]
    raise AssertionError(f"{module} is in no layer; add its package to LAYERS here and to docs/layers.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether `name` is a module or package of moeserve (a source file, a package or the C++ extension)."""
    relative = Path(*name.split("."))
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file() or any(
        (ROOT / relative.parent).glob(relative.name + ".*.so")
    )


def imported_modules(path: Path) -> set[str]:
    """The moeserve modules `path` imports: `from pkg import sub` names the submodule when there is one."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
    return {name for name in found if name == "moeserve" or name.startswith("moeserve.")}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in sorted(PACKAGE.rglob("*.py"))}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in graph.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]


def test_no_module_imports_a_layer_above_its_own():
    upward = upward_imports(import_graph())
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_the_walk_sees_imports_of_every_kind():
    graph = import_graph()
    assert "moeserve.kv.context" in graph["moeserve.layers.attention"]  # from a.b import C
    assert "moeserve.codecs" in graph["moeserve.offload.policy"]  # from moeserve import codecs
    assert "moeserve._szp_cpu" in graph["moeserve.codecs.szp_cpu"]  # inside a function, the extension
    assert "moeserve.loader" in graph["moeserve.eval.perturb"]
    assert "moeserve" in graph["moeserve.eval.evaluate"]  # from moeserve import SamplingParams


def test_upward_imports_are_reported():
    graph = {
        "moeserve.layers.attention": {"moeserve.kv.context", "moeserve.engine.sequence"},
        "moeserve.cli": {"moeserve"},
    }
    assert upward_imports(graph) == ["moeserve.layers.attention (layers) imports moeserve.engine.sequence (engine)"]


def test_docs_list_the_same_layers_in_the_same_order():
    text = (ROOT / "docs" / "layers.md").read_text()
    listed = re.findall(r"^(\d+)\. \*\*([^*]+)\*\*: (.+?)\.\s", text, re.M)
    assert [(int(number), name) for number, name, _ in listed] == [(i + 1, name) for i, (name, _) in enumerate(LAYERS)]
    for (_, _, modules), (_, prefixes) in zip(listed, LAYERS):
        assert re.findall(r"`([\w.]+)`", modules) == list(prefixes)


if __name__ == "__main__":  # `python tests/test_layers.py`: the graph between layers, as text
    edges: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        for target in targets:
            if layer_of(target) != layer_of(module):
                edges.setdefault(LAYERS[layer_of(module)][0], set()).add(LAYERS[layer_of(target)][0])
    for name, _ in reversed(LAYERS):
        below = sorted(edges.get(name, ()), key=lambda n: -[layer for layer, _ in LAYERS].index(n))
        print(f"{name:>16} -> {', '.join(below)}")
