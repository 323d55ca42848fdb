"""`SamplingParams`: how one request is decoded. Validated on construction."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

from moeserve.errors import InputError


@dataclass(init=False)
class SamplingParams:
    max_tokens: int | None = 16  # None: until a stop condition or the end of the context
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = no top-k filtering
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # return this many top alternatives per generated token
    prompt_logprobs: int | None = None  # likewise for every prompt token (after the first)

    def __init__(self, **options):
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InputError(
                f"unknown sampling option {unknown[0]!r}; valid options are {', '.join(sorted(known))}."
            )
        for name, spec in known.items():
            if name in options:
                value = options[name]
            elif spec.default_factory is not MISSING:
                value = spec.default_factory()
            else:
                value = spec.default
            setattr(self, name, value)
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None:
            self.top_k = -1
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise InputError(f"max_tokens must be an integer of at least 1, got {self.max_tokens!r}.")
        if not _is_finite_number(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}.")
        if not _is_finite_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise InputError(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}.")
        if self.seed is not None and not _is_int(self.seed):
            raise InputError(f"seed must be an integer, got {self.seed!r}.")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InputError(f"stop must be a non-empty string or a list of them, got {self.stop!r}.")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise InputError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}.")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise InputError(f"{name} must be a non-negative integer, got {value!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    """Booleans are not numbers here, and NaN / ±inf are refused: NaN compares false with every
    bound, so it would slip past the range checks and turn the sampler's probabilities into NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
