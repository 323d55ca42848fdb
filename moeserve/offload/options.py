"""`OffloadOptions`: how the routed experts are kept, in one value built once from the CLI, the server's
policy variants or `LLM(...)`'s keyword arguments, and turned into a runtime by
`offload.runtime.build_offload_runtime`.

The compute device is not an option here: it is the loaded model's, fixed when the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeserve.errors import MoeServeError
from moeserve.offload.cache import EVICTION_POLICIES
from moeserve.offload.filler import default_decode_workers


class OffloadError(MoeServeError):
    """An offloading option, cache budget or store that cannot be served."""


@dataclass(frozen=True)
class OffloadOptions:
    # Per-layer error-bound policy: YAML/JSON path or text, or a dict. None: lossless (`codec: raw`)
    # when offloading, or no offloading at all when `expert_cache` is None too.
    policy: str | Path | dict | None = None
    expert_cache: str | int | None = None  # decoded-expert budget: "25%", "512MiB" or bytes; None = all
    eviction: str = "lfu"  # "lfu" (with aging) or "lru"
    prefetch: bool = True  # predict and load the next MoE layers' experts ahead of time
    decode_workers: int | None = None  # CPU decode threads; None: default_decode_workers()
    # MoE layers ahead to predict; None: as many as the cache has room for (offload/lookahead.py)
    prefetch_depth: int | None = None

    def __post_init__(self):
        if self.eviction not in EVICTION_POLICIES:
            raise OffloadError(
                f"eviction {self.eviction!r} is not known; use one of {', '.join(EVICTION_POLICIES)}."
            )
        workers = self.decode_workers
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
            raise OffloadError(f"decode_workers must be a positive integer, got {workers!r}.")
        depth = self.prefetch_depth
        if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
            raise OffloadError(
                f"prefetch depth must be a positive number of MoE layers to predict ahead, got {depth!r}; "
                "leave it out to let the cache size choose."
            )
        if depth is not None and not self.prefetch:
            raise OffloadError("a prefetch depth is given with prefetch turned off; drop one of the two.")

    @property
    def workers(self) -> int:
        """CPU decode workers the runtime starts."""
        return default_decode_workers() if self.decode_workers is None else self.decode_workers

    def offloads(self, compressed_dir: bool) -> bool:
        """Whether these options keep experts in a compressed store (a compressed directory always does)."""
        return self.policy is not None or self.expert_cache is not None or compressed_dir
