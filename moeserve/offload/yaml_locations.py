"""YAML (or JSON) text → its data plus the line and column of every key and list item in it.

Validators report where a value went wrong as a key path such as ("rules", 1, "error_bound"); `where`
maps such paths to the 1-based (line, column) of that key in the text, so an error can point at it.
The text is composed once into yaml's node tree (which keeps positions) and constructed into data with
the safe constructor; duplicate keys, which yaml silently collapses to the last one, are refused here.

A policy arrives from anyone who can reach the server, so the text is bounded before anything is built
from it: a first pass over its parser events (libyaml's, where pyyaml has it: ten times faster, and
its event parser does not recurse) refuses anchors and aliases (a few hundred bytes of nested aliases
expand to billions of values: the "billion laughs"), nesting deeper than MAX_DEPTH (the composer
recurses once per level), more than MAX_NODES values, and a parse that runs past PARSE_SECONDS. Only
then is the node tree composed. A policy needs none of these: it nests four levels deep
(rules → rule → layers → item) and holds a few hundred values.
"""

from __future__ import annotations

import json
import time
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]
Location = tuple[int, int]  # 1-based line, column

MAX_CHARS = 2**20
MAX_DEPTH = 16
MAX_NODES = 20_000
PARSE_SECONDS = 0.5

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_OPENS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSES = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
_NODES = (yaml.ScalarEvent, *_OPENS)


class YamlSourceError(Exception):
    """Text that cannot be used as a document. `problem` is a clause that names what is wrong and what to
    do; `path` is set for a duplicate key. line and column are 1-based, None when unknown."""

    def __init__(self, problem: str, line: int | None = None, column: int | None = None, path: KeyPath = ()):
        super().__init__(problem)
        self.problem, self.line, self.column, self.path = problem, line, column, path


def parse(text: str) -> tuple[Any, dict[KeyPath, Location]]:
    """The document's data (None when empty) and the location of each key path in it."""
    if len(text) > MAX_CHARS:
        raise YamlSourceError(f"the text has {len(text)} characters, more than the {MAX_CHARS} a policy may have; shorten it")
    try:
        return _load(text)
    except yaml.YAMLError as exc:
        # JSON is YAML except that YAML forbids tabs as indentation; in valid JSON a tab can only be
        # whitespace between tokens (never inside a string), so a space in its place changes nothing.
        if "\t" not in text or not _is_json(text):
            raise _syntax_error(exc) from None
    try:
        return _load(text.replace("\t", " "))
    except yaml.YAMLError as exc:
        raise _syntax_error(exc) from None


def locate(where: dict[KeyPath, Location], path: KeyPath) -> Location | None:
    """Location of `path`, or of its nearest enclosing key when the key itself is absent (a missing key)."""
    for end in range(len(path), -1, -1):
        if path[:end] in where:
            return where[path[:end]]
    return None


def _load(text: str) -> tuple[Any, dict[KeyPath, Location]]:
    _check_events(text)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        where: dict[KeyPath, Location] = {}
        if node is None:
            return None, where
        where[()] = _position(node)
        _index(node, (), where)
        return loader.construct_document(node), where
    finally:
        loader.dispose()


def _check_events(text: str) -> None:
    """Refuse anchors, aliases, deep nesting, too many values and a slow parse, before composing."""
    deadline = time.monotonic() + PARSE_SECONDS
    loader = _Loader(text)
    depth = nodes = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            line, column = _position(event)
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
                raise YamlSourceError(
                    f"the {'alias' if sign == '*' else 'anchor'} {sign}{event.anchor} is not allowed, since a policy "
                    f"may not use anchors or aliases (& and *); write each value out",
                    line,
                    column,
                )
            if isinstance(event, _OPENS):
                depth += 1
                if depth > MAX_DEPTH:
                    raise YamlSourceError(
                        f"the text nests deeper than {MAX_DEPTH} levels (a policy needs 4); remove the extra nesting",
                        line,
                        column,
                    )
            elif isinstance(event, _CLOSES):
                depth -= 1
            if isinstance(event, _NODES):
                nodes += 1
                if nodes > MAX_NODES:
                    raise YamlSourceError(
                        f"the text holds more than {MAX_NODES} values (a policy needs a few hundred); shorten it",
                        line,
                        column,
                    )
            if time.monotonic() > deadline:
                raise YamlSourceError(f"the text took longer than {PARSE_SECONDS} s to parse; shorten it", line, column)
    finally:
        loader.dispose()


def _index(node: yaml.Node, path: KeyPath, where: dict[KeyPath, Location]) -> None:
    # Recursion is bounded: _check_events refused more than MAX_DEPTH levels, and without aliases the
    # node tree is a tree, visited once per node.
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            child = (*path, key)
            if child in where:
                line, column = _position(key_node)
                raise YamlSourceError(f"{dotted(child)} appears twice; keep one", line, column, child)
            where[child] = _position(key_node)
            _index(value_node, child, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            where[(*path, i)] = _position(item)
            _index(item, (*path, i), where)


def _position(item: yaml.Node | yaml.Event) -> Location:
    return item.start_mark.line + 1, item.start_mark.column + 1


def _syntax_error(exc: yaml.YAMLError) -> YamlSourceError:
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join((getattr(exc, "problem", None) or str(exc).splitlines()[0]).split())
    clause = f"the text is not valid YAML ({problem}); fix it there"
    if mark is None:
        return YamlSourceError(clause)
    return YamlSourceError(clause, mark.line + 1, mark.column + 1)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the interpreter's stack
        return False
    return True


def dotted(path: KeyPath) -> str:
    """A key path as written in messages: ("rules", 1, "error_bound") → "rules[1].error_bound"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out

