"""Memory sizes as users write them: a share ("25%"), bytes with a unit ("512MiB", "2GB") or a byte count."""

from __future__ import annotations

import re

from moeserve.errors import MoeServeError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(spec: str | int | float, whole: int, what: str, whole_name: str, error: type[MoeServeError]) -> int:
    """`spec` in bytes, a share being of `whole` bytes (`whole_name` in words); `what` names the option in
    the error sentence."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = int(spec)
    elif isinstance(spec, str) and spec.strip().endswith("%"):
        try:
            share = float(spec.strip()[:-1])
            value = int(whole * share / 100)
        except (ValueError, OverflowError):  # not a number, or nan% / inf%
            value = -1
        else:
            if share > 100:
                raise error(f"{what} {spec!r} is more than {whole_name}; use at most '100%'.")
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(spec))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _UNITS:
            raise error(f"{what} {spec!r} is not understood; use e.g. '25%', '512MiB' or a byte count.")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise error(f"{what} {spec!r} must be positive; use e.g. '25%' or '512MiB'.")
    return value
