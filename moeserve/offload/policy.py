"""Per-layer error-bound policy: the codec, bound mode and error bound of every routed-expert tensor.

Data flow (CPU, once per model load; nothing here touches a tensor):

    YAML / JSON text, a file or a dict ──load_policy──► Policy          schema: keys, types, codecs, bounds
    Policy + the model's shape ───────Policy.resolve──► ResolvedPolicy  groups, layer / expert ids, precedence
    ResolvedPolicy.setting(layer, expert, projection) ─► TensorSetting  the arguments of codecs.encode

Both steps are pure: they return new frozen objects or raise one PolicyError that names the source, the line
and column, the key path (`rules[1].error_bound`) and what to do, so a bad policy is never half applied.
pydantic checks the mapping (the edge); yaml_locations.py turns its error paths into lines; past load_policy
everything is frozen data. The semantics (groups, precedence, inheritance across codecs) are specified in
docs/policy.md; policy_resolve.py implements them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from moeserve import codecs
from moeserve.codecs.bounds import MODES
from moeserve.errors import MoeServeError
from moeserve.offload.policy_resolve import (
    GROUPS,
    PROJECTIONS,
    ResolvedPolicy,
    Span,
    TensorSetting,
    bounded,
    resolve,
)
from moeserve.offload.yaml_locations import KeyPath, Location, YamlSourceError, dotted, locate, parse

__all__ = ["PROJECTIONS", "Default", "Policy", "PolicyError", "ResolvedPolicy", "Rule", "TensorSetting", "load_policy"]

_PATH_SUFFIXES = (".yaml", ".yml", ".json")


class PolicyError(MoeServeError):
    """A policy that cannot be used. `path` is the key path; line and column are 1-based, None for a dict."""

    def __init__(self, message: str, path: str = "", line: int | None = None, column: int | None = None):
        super().__init__(message)
        self.path, self.line, self.column = path, line, column


Item = int | Span | str  # str: "all" or a group name
_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def _invalid(problem: str) -> PydanticCustomError:
    # The message reads after the key path: "rules[1].error_bound" + " must be ...".
    return PydanticCustomError("policy", problem)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


def _items(noun: str, names: tuple[str, ...]):
    """Validator of a layers / experts selector: one item or a list of them → a tuple of items."""
    named = names[0] if len(names) == 1 else f"one of {', '.join(names)}"
    hint = f"an id, a range such as \"2-5\", {named}, or a list of these"

    def item(value: Any) -> Item:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise _invalid(f"names {noun} {value}, but ids start at 0")
            return value
        if isinstance(value, str):
            if value.strip() in names:
                return value.strip()
            match = _RANGE.fullmatch(value)
            if match and match[2] is None:  # a quoted single id such as "7"
                return int(match[1])
            if match:
                first, last = int(match[1]), int(match[2])
                if first > last:
                    raise _invalid(f"has the range {value!r}, which runs backwards; write \"{last}-{first}\"")
                return Span(first, last)
        raise _invalid(f"must be {hint}, got {_show(value)}")

    def validate(value: Any) -> tuple[Item, ...]:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise _invalid(f"is an empty list; give {hint}, or leave the key out to select every {noun}")
        return tuple(item(v) for v in values)

    return PlainValidator(validate)


def _projections(value: Any) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    wrong = [v for v in values if not isinstance(v, str) or v not in PROJECTIONS]
    if not values or wrong:
        raise _invalid(f"must be gate, up or down, or a list of these, got {_show(wrong[0] if wrong else value)}")
    return tuple(p for p in PROJECTIONS if p in values)  # canonical order: equal selections compare equal


def _dump_items(items: tuple[Item, ...]) -> Any:
    out = [f"{i.first}-{i.last}" if isinstance(i, Span) else i for i in items]
    return out[0] if len(out) == 1 else out


def _codec(value: Any) -> str:
    if not isinstance(value, str) or value not in codecs.names():
        raise _invalid(f"must be one of {', '.join(codecs.names())}, got {_show(value)}")
    return value


def _mode(value: Any, info: ValidationInfo) -> str:
    if not isinstance(value, str) or value not in MODES:
        raise _invalid(f"must be one of {', '.join(MODES)}, got {_show(value)}")
    _refuse_beside_unbounded("mode", info)
    return value


def _bound(value: Any, info: ValidationInfo) -> float:
    number = None
    # Numeric strings too: YAML 1.1 reads 1e-3 (no dot) and JSON's 1e-3 as the string "1e-3".
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            pass
    if number is None:
        raise _invalid(f"must be a number such as 1.0e-3, got {_show(value)}")
    if not (math.isfinite(number) and number > 0):
        raise _invalid(f"must be a finite number above 0, got {_show(value)}; use a bound such as 1.0e-3")
    _refuse_beside_unbounded("error_bound", info)
    return number


def _refuse_beside_unbounded(key: str, info: ValidationInfo) -> None:
    codec = info.data.get("codec")  # absent when the codec itself was invalid: that error is reported instead
    if codec is not None and not bounded(codec):
        choices = ", ".join(n for n in codecs.names() if bounded(n))
        raise _invalid(f"is set, but codec {codec} takes no {key}; remove {key} or use a bounded codec ({choices})")


_Mode = Annotated[str | None, PlainValidator(_mode)]
_Bound = Annotated[float | None, PlainValidator(_bound)]
_Selector = PlainSerializer(_dump_items)  # back to the shortest YAML form, for to_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Default(_Strict):
    """The setting of every expert tensor before any rule. Field order matters: mode and error_bound are
    checked against the codec validated before them."""

    codec: Annotated[str, PlainValidator(_codec)]
    mode: _Mode = None  # None: rel under a bounded codec (policy_resolve.DEFAULT_MODE)
    error_bound: _Bound = None

    @model_validator(mode="after")
    def _bounded_needs_bound(self) -> Default:
        if bounded(self.codec) and self.error_bound is None:
            raise _invalid(f"uses codec {self.codec}, which needs an error_bound; add one, e.g. error_bound: 1.0e-3")
        return self


class Rule(_Strict):
    """Overrides for the tensors its selectors match (a selector left out matches everything); the fields it
    leaves out keep the value earlier settings gave each tensor."""

    layers: Annotated[tuple[Item, ...] | None, _items("layer", ("all", *GROUPS)), _Selector] = None
    experts: Annotated[tuple[Item, ...] | None, _items("expert", ("all",)), _Selector] = None
    projections: Annotated[tuple[str, ...] | None, PlainValidator(_projections), _Selector] = None
    codec: Annotated[str | None, PlainValidator(_codec)] = None
    mode: _Mode = None
    error_bound: _Bound = None

    @model_validator(mode="after")
    def _overrides_something(self) -> Rule:
        if self.codec is None and self.mode is None and self.error_bound is None:
            raise _invalid("changes nothing; give it a codec, mode or error_bound")
        return self


class _Document(_Strict):
    default: Default
    rules: tuple[Rule, ...] = ()

    @field_validator("rules", mode="before")
    @classmethod
    def _empty_rules(cls, value: Any) -> Any:
        return () if value is None else value  # `rules:` with every rule commented out


@dataclass(frozen=True)
class Policy:
    """A schema-valid policy, not yet tied to a model. Build it with load_policy."""

    default: Default
    rules: tuple[Rule, ...] = ()
    # Where the policy came from, for error messages only: policies with equal settings compare equal.
    origin: str = field(default="policy", compare=False, repr=False)
    where: Mapping[KeyPath, Location] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def default_policy(expert_quantization: str | None = None) -> Policy:
        """What moeserve uses without a policy: every expert stored raw (lossless, uncompressed), or,
        for a checkpoint whose experts ship as MXFP4, kept in MXFP4 (re-encoding 4-bit weights under an
        error bound would only add error)."""
        return Policy(Default(codec="mxfp4" if expert_quantization == "mxfp4" else "raw"))

    def resolve(self, moe_layers: Sequence[int], num_layers: int, num_experts: int) -> ResolvedPolicy:
        """This policy applied to a model; a PolicyError (with the rule's line) if a rule does not fit it."""
        return resolve(self, moe_layers, num_layers, num_experts)

    def to_yaml(self) -> str:
        """YAML text that load_policy reads back into an equal policy."""
        data: dict[str, Any] = {"default": self.default.model_dump(exclude_none=True)}
        if self.rules:
            data["rules"] = [rule.model_dump(exclude_none=True) for rule in self.rules]
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

    def error(self, path: KeyPath, problem: str) -> PolicyError:
        """A PolicyError about the key at `path` of this policy's source."""
        return _error(self.origin, self.where, path, problem)


def load_policy(source: str | os.PathLike | Mapping[str, Any] | Policy) -> Policy:
    """A Policy from a file path (a str ending in .yaml / .yml / .json, or a PathLike), YAML or JSON text
    (any other str), a mapping, or a Policy (returned as is). Checks the schema, not the model."""
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        return _validate(dict(source), "policy", {})
    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and "\n" not in source and source.strip().lower().endswith(_PATH_SUFFIXES)
    ):
        path = Path(source).expanduser()
        origin = f"policy file {path}"
        text = _read(path, origin)
    elif isinstance(source, str):
        origin, text = "policy text", source
    else:
        kind = type(source).__name__
        raise TypeError(f"load_policy takes a path, YAML/JSON text, a mapping or a Policy, not {kind}")
    try:
        data, where = parse(text)
    except YamlSourceError as exc:
        place = origin if exc.line is None else f"{origin}, line {exc.line}, column {exc.column}"
        raise PolicyError(f"{place}: {exc.problem}.", dotted(exc.path), exc.line, exc.column) from None
    return _validate(data, origin, where)


def _read(path: Path, origin: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{origin} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise PolicyError(f"{origin} cannot be read ({reason}); pass a readable UTF-8 text file.") from None


def _validate(data: Any, origin: str, where: Mapping[KeyPath, Location]) -> Policy:
    try:
        document = _Document.model_validate(data)
    except ValidationError as exc:
        # One sentence: the error that comes first in the text (pydantic orders them by field instead).
        # On a tie a key that is in the text (a misspelt one) goes before one that is missing from it.
        first = min(
            exc.errors(),
            key=lambda e: (locate(where, e["loc"]) or (math.inf, math.inf), tuple(e["loc"]) not in where),
        )
        raise _error(origin, where, first["loc"], _problem(first)) from None
    return Policy(document.default, document.rules, origin, where)


_MISSING = {
    ("default",): "is missing; start the policy with e.g. default: {codec: szp, mode: rel, error_bound: 1.0e-3}",
    ("default", "codec"): "is missing; name one of " + ", ".join(codecs.names()),
}


def _problem(err: Mapping[str, Any]) -> str:
    """The message of one pydantic error, worded to follow its key path."""
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    if kind == "policy":
        return err["msg"]
    if kind == "extra_forbidden":
        model = _Document if len(loc) == 1 else Default if loc[0] == "default" else Rule
        return f"is not a known key; use {', '.join(model.model_fields)}"
    if kind == "missing":
        return _MISSING.get(loc, "is missing; add it")
    if not loc and value is None:
        return "is empty; start it with e.g. default: {codec: raw}"
    if not loc:
        return f"must be a mapping with the keys default and rules, got {_show(value)}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a mapping, got {_show(value)}"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list of rules, got {_show(value)}"
    return f"is not valid ({err['msg'].rstrip('.')})"


def _error(origin: str, where: Mapping[KeyPath, Location], path: KeyPath, problem: str) -> PolicyError:
    key = dotted(path)
    loc = locate(where, path)
    place = origin if loc is None else f"{origin}, line {loc[0]}, column {loc[1]}"
    return PolicyError(f"{place}: {key or 'the policy'} {problem}.", key, *(loc or (None, None)))

