"""The expert cache's bookkeeping in C++ (csrc/slot_cache.h), for the configuration a CPU serves by default.

In:  the provider's store, slot pool and cache policy, and the prefetch depth forced on it (if any).
Out: a `SlotCache` (moeserve._szp_cpu) over the same pool, or None where the configuration
     needs the provider's Python: guesses more than one MoE layer ahead (a forced prefetch depth above 1),
     an eviction policy it does not know (it knows LRU and LFU), a GPU pool, an expert not in szp (the only codec
     with a native decoder), a pool smaller than one layer's experts, or an extension built without it.

Why: with compiled steps the provider's Python per MoE layer (claiming slots, pinning, statistics, the call
into the Python host op) cost more than the step's compute on a small model: the embedded model at a 25% cache
ran at ~0.4x its resident speed, ~9 of the ~16 experts a token asks for missing. The C++ cache runs the same policy
(tests/test_native_slots.py holds it to the Python provider's hits, misses and slots), and a compiled step calls
it from its own C++ op (torch_ops.cpp held_expert_slots) without entering Python.
"""

from __future__ import annotations

import torch

from moeserve.codecs.szp_cpu import NATIVE_DECODER, cpu_module, decode_target
from moeserve.offload.cache import ExpertCache, SlotPool
from moeserve.offload.filler import usable_cores
from moeserve.offload.store import CompressedStore


def native_slot_cache(
    store: CompressedStore, pool: SlotPool, cache: ExpertCache, forced_depth: int | None, workers: int,
):
    """A SlotCache for this configuration, or None where it needs the provider's Python (module docstring).
    `forced_depth`: the prediction depth the user forced (None: the provider's choice, none on a CPU).
    `workers`: the decode workers asked for; as many of them as
    there are cores beyond torch's threads become the cache's decode helpers (csrc/decode_team.h)."""
    layers = sorted({layer for layer, _ in store.experts})
    experts = len(store.experts) // len(layers)
    eligible = (
        (forced_depth is None or forced_depth <= 1)
        and cache.eviction_name in ("lru", "lfu")
        and pool.memory.device.type == "cpu"
        and pool.num_slots >= experts
        and all(blob.codec == "szp" and blob.numel for packed in store.experts.values() for blob in packed.blobs)
    )
    extension = cpu_module() if eligible else None
    if extension is None or not hasattr(extension, "SlotCache"):
        return None
    helpers = max(0, min(workers, usable_cores() - torch.get_num_threads()))
    slots = extension.SlotCache(pool.num_slots, layers, experts, helpers, cache.eviction_name)
    for slot in range(pool.num_slots):
        weights = pool.weights(slot)
        targets = [decode_target(matrix) for matrix in (weights.gate, weights.up, weights.down)]
        slots.set_target(slot, [bits for bits, _ in targets], targets[0][1])
    for (layer, expert), packed in store.experts.items():
        slots.set_source(layer, expert, [NATIVE_DECODER.source(blob) for blob in packed.blobs], packed.nbytes)
    return slots

