"""The one place a user's device string becomes a torch.device."""

from __future__ import annotations

import torch

from moeserve.errors import MoeServeError


def resolve_device(device: str | torch.device | None, error: type[MoeServeError] = MoeServeError) -> torch.device:
    """"cpu", "cuda" or "cuda:N"; None = CUDA when available, else CPU. Problems raise `error`,
    so each caller keeps its own error type (the codecs raise CodecError)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise error(f"device {device!r} is not a valid device; use 'cpu' or 'cuda'.") from None
    if resolved.type not in ("cpu", "cuda"):
        raise error(f"device {device!r} is not supported; use 'cpu' or 'cuda'.")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {device!r} was requested but no CUDA device is available; use 'cpu'.")
    return resolved
