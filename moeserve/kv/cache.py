"""The KV cache: one row per running sequence, rows kept dense so a decode step reads a slice.

Per layer, K and V are [rows, kv_heads, capacity, head_dim] on the compute device; a model with
multi-head latent attention caches one latent "head" per token that serves as keys and values,
so it has `k` only (`separate_values=False`, `v` stays empty). A sequence
owns one row for its whole life. When it leaves, the last row moves into the hole, so the
running sequences always occupy rows 0..n-1 and batched decode attends over `k[:n]` with no
gather. Capacity grows by doubling (rows and length), never past `max_len` positions; memory
is zero-filled so padded positions are finite and masked attention weights stay exact zeros.
"""

from __future__ import annotations

from typing import Protocol

import torch


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


class HasKvRow(Protocol):
    kv_row: int


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        separate_values: bool = True,
    ):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.separate_values = separate_values
        self.max_len = max_len
        self.dtype = dtype
        self.device = device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._owners: list[HasKvRow] = []  # owner of row i
        self._rows_capacity = 0
        self._len_capacity = 0
        self.version = 0  # counts reallocations: what a captured CUDA graph read is gone once it changes

    @property
    def num_rows(self) -> int:
        return len(self._owners)

    def allocate(self, owner: HasKvRow, length: int) -> None:
        """Give `owner` the next free row, with room for `length` positions."""
        self._owners.append(owner)
        owner.kv_row = len(self._owners) - 1
        self.reserve(length)

    def free(self, owner: HasKvRow) -> None:
        """Release `owner`'s row; the last row moves into it (its owner's `kv_row` is updated)."""
        row = owner.kv_row
        last = len(self._owners) - 1
        if row != last:
            moved = self._owners[last]
            for tensors in (self.k, self.v):
                for layer_tensor in tensors:
                    layer_tensor[row].copy_(layer_tensor[last])
            self._owners[row] = moved
            moved.kv_row = row
        self._owners.pop()
        owner.kv_row = -1

    def reserve(self, length: int, rows: int = 0) -> None:
        """Make room for every row to hold `length` positions, and for at least `rows` rows (a
        captured decode step pads its batch with free rows)."""
        rows, cap_rows, cap_len = max(len(self._owners), rows), self._rows_capacity, self._len_capacity
        if rows <= cap_rows and length <= cap_len:
            return
        new_rows = max(rows, 2 * cap_rows, 1) if rows > cap_rows else cap_rows
        # powers of two (or the context length), like decode spans (kv/context.py), so a span never
        # reads past the capacity and growth is rare
        new_len = min(max(next_power_of_two(length), 2 * cap_len, 64), self.max_len) if length > cap_len else cap_len
        shape = (new_rows, self.num_kv_heads, new_len, self.head_dim)
        for tensors in (self.k, self.v) if self.separate_values else (self.k,):
            for i in range(self.num_layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(tensors):
                    grown[:cap_rows, :, :cap_len].copy_(tensors[i])
                    tensors[i] = grown
                else:
                    tensors.append(grown)
        self._rows_capacity, self._len_capacity = new_rows, new_len
        self.version += 1

    @property
    def capacity(self) -> int:
        """Positions each row holds now."""
        return self._len_capacity

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached position takes over all layers (K and V, or MLA's latent)."""
        tensors = 2 if self.separate_values else 1
        return self.num_layers * tensors * self.num_kv_heads * self.head_dim * self.dtype.itemsize
