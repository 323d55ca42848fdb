"""Per-step metadata handed to the model: which cache rows, which positions, which tokens.

Built by the model runner on the host, once per step; the model only reads it. A step is either
a prefill/extend step (each sequence brings `query_len` new tokens after `cached_len` cached
ones) or a decode step (every sequence brings exactly one token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeserve.kv.cache import KVCache


@dataclass
class StepContext:
    cache: KVCache
    positions: torch.Tensor  # [T] long, on the compute device
    rows: list[int]  # cache row of each sequence, in token order
    query_lens: list[int]  # new tokens of each sequence in this step
    cached_lens: list[int]  # tokens of each sequence already in the cache
    is_decode: bool
    row_index: torch.Tensor | None = None  # [B] long: `rows` on the device, for decode-step cache writes
    _decode_masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    @property
    def total_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.cached_lens, self.query_lens)]

    def decode_mask(self, window: int | None) -> torch.Tensor | None:
        """[B, 1, 1, L] bool: which cached positions each decoding sequence may attend to (None = all)."""
        if window not in self._decode_masks:
            lens = torch.tensor(self.total_lens, device=self.positions.device)  # [B]
            longest = max(self.total_lens)
            key_pos = torch.arange(longest, device=self.positions.device)  # [L]
            allowed = key_pos[None, :] < lens[:, None]  # [B, L]
            if window is not None:
                allowed &= key_pos[None, :] > (lens[:, None] - 1 - window)
            needs_mask = not bool(allowed.all())
            self._decode_masks[window] = allowed[:, None, None, :] if needs_mask else None
        return self._decode_masks[window]
