"""Policy variants: the names a request can pick (`MODEL`, `MODEL@NAME`) and the policy each serves.

In:  the LLM's expert provider, handed over to the base variant's first generation, and, per named
     variant, an offloading runtime built over the same resident model; later, runtimes built by a
     policy switch (PUT /v1/policy).
Out: for a request's `model` name, the variant and its *current generation*: the expert provider
     the request's sequences are bound to for their whole life.

A switch installs a new generation; requests already submitted keep the old one (the scheduler
never mixes providers in a step, see engine/scheduler.py), new requests get the new one. The old
generation is retired, and its provider closed and dropped, once its last sequence finishes: each
generation is the only owner of its provider.
Everything here runs on the event loop thread; the step thread only receives providers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeserve.experts import ExpertProvider
from moeserve.offload.runtime import OffloadRuntime, policy_fingerprint
from moeserve.offload.stats import OffloadStats
from moeserve.server.errors import ApiError


@dataclass(eq=False)
class PolicyGeneration:
    """One expert provider a variant serves with."""

    experts: ExpertProvider
    runtime: OffloadRuntime | None  # None: experts resident and uncompressed (no policy)
    number: int  # 0 at start, +1 per switch
    live: int = 0  # sequences bound to it and not yet finished
    fingerprint: str = field(init=False)  # sha256 of the resolved policy; "resident" without one

    def __post_init__(self):
        self.fingerprint = policy_fingerprint(self.runtime)

    @property
    def system_fingerprint(self) -> str:
        """What responses carry in OpenAI's `system_fingerprint`: which policy produced them."""
        return "resident" if self.runtime is None else f"policy-{self.fingerprint[:16]}"

    @property
    def bits_per_value(self) -> dict[int, float]:
        return dict(self.runtime.stats.bits_per_value) if self.runtime is not None else {}


@dataclass(eq=False)
class Variant:
    name: str  # the canonical served name, used as the metrics' model_name label
    current: PolicyGeneration
    stats: list[OffloadStats] = field(default_factory=list)  # every generation's, so counters never go down
    retiring: list[PolicyGeneration] = field(default_factory=list)

    def __post_init__(self):
        if self.current.runtime is not None:
            self.stats.append(self.current.runtime.stats)

    def install(self, runtime: OffloadRuntime) -> None:
        """Make `runtime` current; the old generation retires once nothing runs on it."""
        self.retiring.append(self.current)
        self.current = PolicyGeneration(runtime.provider, runtime, self.current.number + 1)
        self.stats.append(runtime.stats)

    def collect_retired(self) -> list[PolicyGeneration]:
        """Retiring generations with no sequence left: the caller closes them."""
        done = [g for g in self.retiring if g.live == 0]
        self.retiring = [g for g in self.retiring if g.live > 0]
        return done

    def offload_totals(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for stats in self.stats:
            for key in (
                "hits",
                "misses",
                "prefetches_issued",
                "prefetches_used",
                "bytes_transferred",
                "decode_seconds",
                "wait_seconds",
            ):
                totals[key] = totals.get(key, 0) + getattr(stats, key)
        return totals


class VariantTable:
    """Served names → variants. `MODEL` is the LLM's own policy; `MODEL@NAME` the named ones. When
    the LLM was loaded with the first named policy (no unnamed one was given), `MODEL` is an alias
    of that variant."""

    def __init__(self, model_name: str, base: PolicyGeneration, base_policy_name: str | None = None):
        self.model_name = model_name
        base_name = f"{model_name}@{base_policy_name}" if base_policy_name else model_name
        self.base = Variant(base_name, base)
        self.variants: dict[str, Variant] = {base_name: self.base}
        self.names: dict[str, Variant] = {model_name: self.base, base_name: self.base}

    def add(self, policy_name: str, runtime: OffloadRuntime) -> Variant:
        name = f"{self.model_name}@{policy_name}"
        variant = Variant(name, PolicyGeneration(runtime.provider, runtime, 0))
        self.variants[name] = variant
        self.names[name] = variant
        return variant

    def lookup(self, name: str | None) -> Variant:
        if name is None or name == "":
            return self.base
        variant = self.names.get(name)
        if variant is None:
            served = ", ".join(self.names)
            raise ApiError(
                404, f"the model {name!r} does not exist; this server has {served}.", "model", "model_not_found"
            )
        return variant
