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


def empty_host_cache() -> None:
    """Return the pinned host blocks torch's caching allocator keeps after they are freed.

    `torch.accelerator.empty_host_cache` is recent (absent from torch 2.11); CUDA builds since 2.5 have
    the private binding it wraps; where neither exists the blocks stay cached (memory, not correctness)."""
    public = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    private = getattr(torch._C, "_host_emptyCache", None)
    release = public or private
    if release is not None:
        release()
