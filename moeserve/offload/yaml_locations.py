"""YAML (or JSON) text → its data plus the line and column of every key and list item in it.

Validators report where a value went wrong as a key path such as ("rules", 1, "error_bound"); `where`
maps such paths to the 1-based (line, column) of that key in the text, so an error can point at it.
The text is composed once into yaml's node tree (which keeps positions) and constructed once into data
with the safe loader; duplicate keys, which yaml silently collapses to the last one, are refused here.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]
Location = tuple[int, int]  # 1-based line, column


class YamlSourceError(Exception):
    """Text that is not one valid YAML document; line and column are 1-based, None when unknown."""

    def __init__(self, problem: str, line: int | None = None, column: int | None = None, path: KeyPath = ()):
        super().__init__(problem)
        self.problem, self.line, self.column, self.path = problem, line, column, path


def parse(text: str) -> tuple[Any, dict[KeyPath, Location]]:
    """The document's data (None when empty) and the location of each key path in it."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        # JSON is YAML except that YAML forbids tabs as indentation; in valid JSON a tab can only be
        # whitespace between tokens (never inside a string), so a space in its place changes nothing.
        if "\t" not in text or not _is_json(text):
            raise _syntax_error(exc) from None
        text = text.replace("\t", " ")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    where: dict[KeyPath, Location] = {}
    if node is not None:
        where[()] = _position(node)
        _index(node, (), where, set())
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # e.g. a tag the safe loader does not construct, such as !!python/object
        raise _syntax_error(exc) from None
    return data, where


def locate(where: dict[KeyPath, Location], path: KeyPath) -> Location | None:
    """Location of `path`, or of its nearest enclosing key when the key itself is absent (a missing key)."""
    for end in range(len(path), -1, -1):
        if path[:end] in where:
            return where[path[:end]]
    return None


def _index(node: yaml.Node, path: KeyPath, where: dict[KeyPath, Location], open_nodes: set[int]) -> None:
    if id(node) in open_nodes:  # an alias that refers to its own ancestor: nothing new to index below it
        return
    open_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            child = (*path, key)
            if child in where:
                line, column = _position(key_node)
                raise YamlSourceError(f"the key {key!r} appears twice", line, column, child)
            where[child] = _position(key_node)
            _index(value_node, child, where, open_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            where[(*path, i)] = _position(item)
            _index(item, (*path, i), where, open_nodes)
    open_nodes.discard(id(node))


def _position(node: yaml.Node) -> Location:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _syntax_error(exc: yaml.YAMLError) -> YamlSourceError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return YamlSourceError(problem)
    return YamlSourceError(problem, mark.line + 1, mark.column + 1)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
