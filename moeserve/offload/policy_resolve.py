"""A schema-valid Policy applied to one model's shape: a TensorSetting for every routed-expert tensor.

In:  the Policy (policy.py) and the model's MoE layer ids, layer count and experts per layer.
Out: a frozen ResolvedPolicy, queried by the host store per (layer, expert, projection), and its fingerprint.

Every tensor starts at `default`; each rule, in file order, rewrites the tensors its selectors match, so a
later rule wins. Ids a model does not have, and rules that leave a tensor without a coherent setting, raise
the policy's PolicyError at the rule's key; the table is built afresh each call, so nothing is half applied.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

from moeserve.codecs.registry import get as get_codec

if TYPE_CHECKING:
    from moeserve.offload.policy import Default, Policy, Rule

PROJECTIONS = ("gate", "up", "down")
GROUPS = ("shallow", "middle", "deep")  # thirds of the MoE layers, see split_groups
DEFAULT_MODE = "rel"  # the mode of a bounded codec when neither `default` nor a rule names one
UNBOUNDED_MODE = "none"  # the mode of a tensor under raw / int8 / int4, as their Blobs record it
SCHEMA_VERSION = 1  # hashed into every fingerprint: bump it when equal settings start to mean other bytes

Key = tuple[int, int, str]  # (layer, expert, projection)


@dataclass(frozen=True)
class TensorSetting:
    """How one expert tensor is encoded: the codec, mode and error_bound arguments of codecs.encode."""

    codec: str
    mode: str  # abs | rel | mean_abs; UNBOUNDED_MODE for unbounded codecs
    error_bound: float | None  # finite and > 0; None exactly when the codec is unbounded


class Span(NamedTuple):
    """An inclusive id range, written "a-b" with a <= b."""

    first: int
    last: int


def bounded(codec: str) -> bool:
    return get_codec(codec).bounded


@dataclass(frozen=True)
class ResolvedPolicy:
    """A policy applied to one model. `settings` holds every (MoE layer, expert, projection); read-only."""

    moe_layers: tuple[int, ...]  # ascending
    num_layers: int
    num_experts: int
    groups: Mapping[str, tuple[int, ...]]  # shallow / middle / deep → MoE layer ids
    settings: Mapping[Key, TensorSetting] = field(repr=False)

    def setting(self, layer: int, expert: int, projection: str) -> TensorSetting:
        try:
            return self.settings[(layer, expert, projection)]
        except KeyError:
            raise ValueError(
                f"no expert tensor ({layer}, {expert}, {projection!r}) in this model; MoE layers are "
                f"{_ranges(self.moe_layers)}, experts 0-{self.num_experts - 1}, projections {', '.join(PROJECTIONS)}"
            ) from None

    def layer_settings(self, layer: int) -> list[TensorSetting]:
        """The distinct settings used in one MoE layer, in order of first use (expert, then projection)."""
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} is not an MoE layer; the MoE layers are {_ranges(self.moe_layers)}")
        keys = itertools.product((layer,), range(self.num_experts), PROJECTIONS)
        return list(dict.fromkeys(self.settings[k] for k in keys))

    def fingerprint(self) -> str:
        """sha256 hex of every tensor's setting in a fixed order: equal iff the policies resolve identically."""
        lines = [f"moeserve policy v{SCHEMA_VERSION}"]
        for key in itertools.product(self.moe_layers, range(self.num_experts), PROJECTIONS):
            s = self.settings[key]
            lines.append(f"{key[0]} {key[1]} {key[2]} {s.codec} {s.mode} {s.error_bound!r}")
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def split_groups(moe_layers: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Thirds of the MoE layers in order; sizes differ by at most one: the middle third takes the first
    extra layer and the shallow third the second, so 8 layers split 3/3/2 and 10 split 3/4/3."""
    base, extra = divmod(len(moe_layers), 3)
    shallow, middle = base + (extra == 2), base + (extra >= 1)
    layers = tuple(moe_layers)
    cut1, cut2 = shallow, shallow + middle
    return {"shallow": layers[:cut1], "middle": layers[cut1:cut2], "deep": layers[cut2:]}


def resolve(policy: Policy, moe_layers: Sequence[int], num_layers: int, num_experts: int) -> ResolvedPolicy:
    layers = sorted(moe_layers)
    distinct_in_range = len(set(layers)) == len(layers) and all(0 <= x < num_layers for x in layers)
    if num_layers < 1 or num_experts < 1 or not distinct_in_range:
        raise ValueError(  # the shape comes from the model's config, not the user: a caller bug
            f"resolve needs distinct MoE layer ids in 0..num_layers-1 and num_experts >= 1, got moe_layers="
            f"{list(moe_layers)}, num_layers={num_layers}, num_experts={num_experts}"
        )
    groups = split_groups(layers)
    start = _start(policy.default)
    table = {key: start for key in itertools.product(layers, range(num_experts), PROJECTIONS)}
    for i, rule in enumerate(policy.rules):
        layer_ids = _layer_ids(policy, i, rule, layers, groups, num_layers)
        expert_ids = _expert_ids(policy, i, rule, num_experts)
        outcome: dict[TensorSetting, TensorSetting] = {}  # a rule turns equal settings into equal settings
        for key in itertools.product(layer_ids, expert_ids, rule.projections or PROJECTIONS):
            current = table[key]
            if current not in outcome:
                outcome[current] = _apply(policy, i, rule, current, key)
            table[key] = outcome[current]
    return ResolvedPolicy(tuple(layers), num_layers, num_experts, MappingProxyType(groups), MappingProxyType(table))


def _start(default: Default) -> TensorSetting:
    if not bounded(default.codec):
        return TensorSetting(default.codec, UNBOUNDED_MODE, None)
    return TensorSetting(default.codec, default.mode or DEFAULT_MODE, default.error_bound)


def _apply(policy: Policy, i: int, rule: Rule, current: TensorSetting, key: Key) -> TensorSetting:
    """The rule's fields over one tensor's current setting; what it leaves out keeps its current value."""
    codec = rule.codec or current.codec
    tensor = f"layer {key[0]} expert {key[1]} {key[2]}"
    if not bounded(codec):
        # Only reachable when the rule keeps an earlier unbounded codec: the schema refuses `codec: raw`
        # next to a mode or error_bound in the same rule.
        for name, value in (("error_bound", rule.error_bound), ("mode", rule.mode)):
            if value is not None:
                raise policy.error(
                    ("rules", i, name),
                    f"would apply to {tensor}, which uses codec {codec} and takes no {name}; "
                    f"give the rule a bounded codec or narrow its selectors",
                )
        return TensorSetting(codec, UNBOUNDED_MODE, None)
    # An unbounded tensor has no mode or bound to keep: a rule switching it to a bounded codec starts from
    # the same defaults as `default` (mode rel, error_bound required).
    keep_mode, keep_bound = (current.mode, current.error_bound) if bounded(current.codec) else (DEFAULT_MODE, None)
    bound = rule.error_bound if rule.error_bound is not None else keep_bound
    if bound is None:
        raise policy.error(
            ("rules", i, "codec"),
            f"switches {tensor} from {current.codec} to {codec} without an error_bound; add error_bound to the rule",
        )
    return TensorSetting(codec, rule.mode or keep_mode, bound)


def _layer_ids(policy: Policy, i: int, rule: Rule, layers: list[int], groups, num_layers: int) -> list[int]:
    if rule.layers is None:
        return layers
    path, chosen = ("rules", i, "layers"), set()
    for item in rule.layers:
        if isinstance(item, str):
            chosen.update(layers if item == "all" else groups[item])
            continue
        first, last = item if isinstance(item, Span) else (item, item)
        if last >= num_layers:
            raise policy.error(path, f"names layer {last}, but the model's layers are 0-{num_layers - 1}")
        inside = [x for x in layers if first <= x <= last]
        if not inside:
            what = f"names layer {first}, a dense layer without experts" if first == last else (
                f"has the range \"{first}-{last}\", which holds no MoE layer"
            )
            raise policy.error(path, f"{what}; the MoE layers are {_ranges(layers)}")
        chosen.update(inside)
    return sorted(chosen)


def _expert_ids(policy: Policy, i: int, rule: Rule, num_experts: int) -> list[int]:
    if rule.experts is None or "all" in rule.experts:
        return list(range(num_experts))
    chosen = set()
    for item in rule.experts:
        first, last = item if isinstance(item, Span) else (item, item)
        if last >= num_experts:
            raise policy.error(
                ("rules", i, "experts"), f"names expert {last}, but each MoE layer has experts 0-{num_experts - 1}"
            )
        chosen.update(range(first, last + 1))
    return sorted(chosen)


def _ranges(ids: Sequence[int]) -> str:
    """[1, 3, 4, 5, 9] → "1, 3-5, 9"."""
    runs: list[list[int]] = []
    for x in ids:
        if runs and x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"
