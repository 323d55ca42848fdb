"""One memory plan for the compute device: resident weights, expert cache, KV blocks and workspace.

In:  the user's `kv_cache` option (bytes such as "4GiB", a share of device memory such as "30%", or None),
     the device, what the loaded model already takes, and the engine's limits.
Out: the number of KV blocks, and a `MemoryPlan` whose `line()` start-up prints (and `moeserve policy show`).

Defaults. On a GPU the KV cache takes what remains of `gpu_memory_utilization` (0.9) of the device after
everything already allocated there (weights, expert-cache slots, other processes), the activations of the
largest step (measured by a profiling step) and a reserve for CUDA graphs. On a CPU it may use
CPU_DEFAULT_SHARE of physical RAM: the pool is mapped lazily (kv/cache.py), so only blocks in use take
memory. Either way no more blocks are made than `max_num_seqs` sequences of the whole context can hold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moeserve.errors import MoeServeError
from moeserve.kv.blocks import blocks_for
from moeserve.kv.cache import KvLayout
from moeserve.sizes import parse_size

CPU_DEFAULT_SHARE = 0.25  # of physical RAM, the KV cache's default ceiling on a CPU
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
GRAPH_RESERVE_BYTES = 256 * 2**20  # device memory kept back for captured decode steps' private pools
GiB = 2**30


class KvCacheError(MoeServeError):
    """A KV cache size that cannot be served."""


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    weights: int  # resident weights, routed experts included when they are resident
    expert_cache: int  # decoded-expert slots of an offloading provider (0 when experts are resident)
    kv: int
    kv_tokens: int  # positions the KV cache holds, summed over sequences
    workspace: int | None  # reserved for activations and graphs; None on a CPU (taken from the allocator as needed)

    def line(self) -> str:
        workspace = "as needed" if self.workspace is None else _size(self.workspace)
        return (
            f"memory plan ({self.device}): weights {_size(self.weights)} / expert cache {_size(self.expert_cache)} / "
            f"KV {_size(self.kv)} ({self.kv_tokens:,} tokens) / workspace {workspace}"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of `device`; on a CPU, available and physical RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def kv_budget(
    option: str | int | None,
    device: torch.device,
    workspace: int,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
) -> int:
    """Bytes the KV cache may take: the option, or the device's default (module docstring)."""
    free, total = device_memory(device)
    if option is not None:
        return parse_size(option, total, "KV cache size", f"the {device.type}'s memory", KvCacheError)
    if device.type != "cuda":
        return int(total * CPU_DEFAULT_SHARE)
    used = total - free
    budget = int(total * gpu_memory_utilization) - used - workspace - GRAPH_RESERVE_BYTES
    if budget <= 0:
        raise KvCacheError(
            f"no device memory is left for the KV cache: {_size(used)} of {_size(total)} is in use and the largest step "
            f"needs {_size(workspace)} more; raise --gpu-memory-utilization ({gpu_memory_utilization}), lower "
            "--max-num-batched-tokens or keep fewer experts on the device (--expert-cache)."
        )
    return budget


def num_blocks(budget: int, layout: KvLayout, block_size: int, max_len: int, max_num_seqs: int) -> int:
    """Blocks (the null block included) that fit `budget`, capped at what `max_num_seqs` whole contexts use."""
    per_block = layout.bytes_per_block(block_size)
    most = max_num_seqs * blocks_for(max_len, block_size) * len(layout.groups) + 1
    blocks = min(budget // per_block, most)
    smallest = len(layout.groups) + 1  # one block per layer group, and the null block
    if blocks < smallest:
        raise KvCacheError(
            f"a KV cache of {budget:,} bytes holds {budget // per_block} blocks of {block_size} tokens but at least "
            f"{smallest} are needed ({smallest * per_block:,} bytes); raise kv_cache (--kv-cache)."
        )
    return blocks
