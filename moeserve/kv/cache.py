"""The paged KV cache: fixed-size blocks of K and V per layer, one pool for every sequence.

Per layer the pool is [num_blocks, block_size, kv_heads, head_dim] for K and for V; a model with
multi-head latent attention caches one latent "head" per token that serves as keys and values, so it
has K only (`separate_values=False`). Which block holds which sequence's positions is kv/blocks.py's
business; attention reads a step's blocks through its block tables (kv/context.py).

Layers are grouped by attention window (kv/blocks.py). A block id belongs to one group at a time, so
the i-th layer of every group shares one pool tensor: a block costs the bytes of the largest group's
layers, not of all layers (with one group, as most models have, that is every layer).

On a CPU the pool lives in an anonymous memory mapping: the kernel hands out zero pages on first
touch, so a generous budget costs only the blocks ever used, and a block never written reads as
zeros (finite, as masked positions must be). On a GPU the pool is allocated whole at start-up,
zero-filled, and never reallocated, so captured graphs may keep its addresses.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from moeserve import native_ops
from moeserve.kv.blocks import BlockManager

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class KvLayout:
    """What one token's cache entry looks like in each layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    separate_values: bool  # False: MLA's latent serves as both
    windows: tuple[int | None, ...]  # per layer: None = full attention, else its sliding window
    dtype: torch.dtype

    @property
    def groups(self) -> tuple[int | None, ...]:
        """The distinct windows, full attention first."""
        distinct = set(self.windows)
        return tuple(sorted(distinct, key=lambda w: -1 if w is None else w))

    @property
    def slots(self) -> int:
        """Pool tensors per K (and V): the most layers any one group has."""
        return max(self.windows.count(window) for window in self.groups)

    def bytes_per_block(self, block_size: int) -> int:
        tensors = 2 if self.separate_values else 1
        return self.slots * tensors * block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize


class PagedKVCache:
    def __init__(self, layout: KvLayout, num_blocks: int, block_size: int, device: torch.device):
        self.layout = layout
        self.block_size = block_size
        self.device = device
        self.dtype = layout.dtype
        groups = layout.groups
        self.manager = BlockManager(num_blocks, block_size, groups)
        self.group_of_layer = [groups.index(window) for window in layout.windows]
        self.slot_of_layer = [layout.windows[:i].count(w) for i, w in enumerate(layout.windows)]
        shape = (num_blocks, block_size, layout.num_kv_heads, layout.head_dim)
        self.k = [_pool(shape, layout.dtype, device) for _ in range(layout.slots)]
        self.v = [_pool(shape, layout.dtype, device) for _ in range(layout.slots)] if layout.separate_values else []
        # the same memory seen as tokens (for writes) and as blocks (for gathers), made once: a decode step
        # runs a few ops per layer, and on a CPU each costs more than its arithmetic
        self._tokens = [[p.view(-1, *shape[2:]) for p in pools] for pools in (self.k, self.v)]
        self._blocks = [  # per pool slot: its K (and V) seen as [num_blocks, block entries]
            [p.view(num_blocks, -1) for p in pools] for pools in zip(*(t for t in (self.k, self.v) if t))
        ]
        self._entry = shape[2:]  # (G, Dh)
        self._workspace = torch.empty(0, dtype=layout.dtype, device=device)

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    @property
    def num_groups(self) -> int:
        return len(self.layout.groups)

    @property
    def bytes_per_block(self) -> int:
        return self.layout.bytes_per_block(self.block_size)

    @property
    def bytes_per_token(self) -> int:
        """What one cached position costs: a block slot in every layer group."""
        return self.num_groups * self.bytes_per_block // self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def workspace_nbytes(self) -> int:
        return self._workspace.numel() * self._workspace.element_size()

    def keys(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s K pool [num_blocks, block_size, G, Dh] (MLA: its latents)."""
        return self.k[self.slot_of_layer[layer]]

    def values(self, layer: int) -> torch.Tensor:
        return self.v[self.slot_of_layer[layer]]

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor | None) -> None:
        """Store one layer's entries [N, G, Dh] at flat positions `slots` [N] (block * block_size + offset)."""
        slot = self.slot_of_layer[layer]
        if torch.compiler.is_compiling():
            # An opaque in-place op: written as index_copy_ into the pool (or a view of it), a compiled
            # step would copy the whole pool back after every write (functionalization of an input's mutation).
            native_ops.ops().kv_write(self.k[slot], self.v[slot] if values is not None else None, slots, keys, values)
            return
        self._tokens[0][slot].index_copy_(0, slots, keys)
        if values is not None:
            self._tokens[1][slot].index_copy_(0, slots, values)

    def workspace(self, blocks: int) -> list[torch.Tensor] | None:
        """Where a gather of `blocks` blocks goes: [blocks, block entries] for keys (and values), in a
        workspace kept from step to step, so a decode step allocates nothing the size of its KV. None while
        compiling: the compiled step manages its own buffers."""
        if torch.compiler.is_compiling():
            return None
        per_block = self._blocks[0][0].shape[1]
        part = blocks * per_block
        parts = len(self._blocks[0])
        if self._workspace.numel() < parts * part:
            self._workspace = torch.empty(parts * part, dtype=self.dtype, device=self.device)
        return [self._workspace[i * part : (i + 1) * part].view(blocks, per_block) for i in range(parts)]

    def gather(
        self, layer: int, index: torch.Tensor, rows: int, out: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks `index` [rows * n] names (row-major), in order, of one layer's keys and values:
        [rows, n * block_size, G, Dh] each (values None for MLA), into `out` (`workspace`) when given."""
        slot = self.slot_of_layer[layer]
        if torch.compiler.is_compiling():
            # the block views made in the graph from the pools kv_write writes: a view handed in beside its
            # pool makes two aliased inputs of a mutated tensor, which the compiled step's wrapper then
            # rebuilds on every call (~60 us a step for 8 layers)
            pools = [p[slot].view(self.num_blocks, -1) for p in (self.k, self.v) if p]
        else:
            pools = self._blocks[slot]
        if out is None:
            gathered = [pool[index] for pool in pools]
        else:
            gathered = [torch.index_select(pool, 0, index, out=o) for pool, o in zip(pools, out)]
        keys = gathered[0].view(rows, -1, *self._entry)
        return keys, gathered[1].view(rows, -1, *self._entry) if len(gathered) > 1 else None


# A plain CPU kernel (no autograd or custom_op wrappers): a compiled decode step calls it once per layer.
_library = torch.library.Library("moeserve", "FRAGMENT")
_library.define("kv_write(Tensor(a!) k_pool, Tensor(b!)? v_pool, Tensor slots, Tensor keys, Tensor? values) -> ()")


def _kv_write(k_pool, v_pool, slots, keys, values) -> None:
    """pools [num_blocks, block_size, G, Dh] ← entries [N, G, Dh] at flat positions slots [N]."""
    k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, slots, keys)
    if v_pool is not None:
        v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, slots, values)


for _key in ("CPU", "CUDA"):
    _library.impl("kv_write", _kv_write, _key)
torch.library.register_fake("moeserve::kv_write", lambda k_pool, v_pool, slots, keys, values: None, lib=_library)


def _pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    # anonymous pages: zero until first written, and resident only once touched
    pages = mmap.mmap(-1, numel * dtype.itemsize)
    return torch.frombuffer(pages, dtype=dtype, count=numel).view(shape)
