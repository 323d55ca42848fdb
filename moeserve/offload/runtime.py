"""Assembles the offloading runtime for one loaded model: store, slot pool, cache, filler, provider.

In:  the loaded model (its stored experts, or a compressed store written by `moeserve compress`), its
     compute device, and `OffloadOptions` (policy, cache budget, eviction, prefetch and its depth,
     decode workers).
Out: an `OffloadedExpertProvider` for the model, plus the resolved policy and store for reporting.

Compressed stores are cached on disk under $MOESERVE_CACHE_DIR (default ~/.cache/moeserve),
keyed by the checkpoint's files and the resolved policy, so a restart does not recompress.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moeserve.config import ModelConfig
from moeserve.loader import LoadedModel, iter_stored_experts
from moeserve.offload.cache import ExpertCache, SlotPool, slot_dtype
from moeserve.offload.filler import CpuSlotFiller
from moeserve.offload.gpu_filler import GpuSlotFiller
from moeserve.offload.options import OffloadError, OffloadOptions
from moeserve.offload.policy import Policy, ResolvedPolicy, load_policy
from moeserve.offload.provider import OffloadedExpertProvider
from moeserve.offload.stats import OffloadStats
from moeserve.offload.store import CompressedStore
from moeserve.sizes import parse_size
from moeserve.offload.streams import CudaStreams
from moeserve.paths import cache_root

STORE_FILE = "experts.msstore"
STORE_MARKER = "moeserve_store.json"  # present in directories written by `moeserve compress`
_STORE_FORMAT = 2  # 2: the index records each expert's gate/up layout
@dataclass
class OffloadRuntime:
    options: OffloadOptions
    provider: OffloadedExpertProvider
    policy: ResolvedPolicy
    policy_source: Policy
    store: CompressedStore
    stats: OffloadStats
    budget_bytes: int
    num_slots: int


def policy_fingerprint(runtime: OffloadRuntime | None) -> str:
    """What computes with these experts: the sha256 of the runtime's resolved policy, or "resident" for
    resident, uncompressed experts (the KV prefix cache's salt, and the server's policy identity)."""
    return "resident" if runtime is None else runtime.policy.fingerprint()


def is_compressed_dir(model_dir: Path) -> bool:
    return (model_dir / STORE_MARKER).is_file()


def parse_budget(spec: str | int | float, total_bytes: int) -> int:
    """'25%' of all decoded experts, '512MiB' / '2GB', or a number of bytes → bytes."""
    return parse_size(spec, total_bytes, "expert cache size", "all the experts", OffloadError)


def checkpoint_identity(model_dir: Path) -> str:
    """Names, sizes and modification times of the weight files and config: cheap, and any
    re-export changes it."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def store_cache_path(model_dir: Path, policy: ResolvedPolicy) -> Path:
    root = cache_root()
    key = hashlib.sha256(
        f"{_STORE_FORMAT}:{checkpoint_identity(model_dir.resolve())}:{policy.fingerprint()}".encode()
    ).hexdigest()[:32]
    return root / "stores" / f"{key}.msstore"


def build_offload_runtime(
    loaded: LoadedModel, options: OffloadOptions, device: torch.device, progress: bool = True
) -> OffloadRuntime:
    """The one way to a runtime: the store for `options.policy` (read from a compressed directory, the
    disk cache, or encoded from `loaded.checkpoint`), and a provider over it on `device`."""
    config, model_dir, policy_source = loaded.config, loaded.model_dir, options.policy
    pin = device.type == "cuda"
    compressed_dir = is_compressed_dir(model_dir)
    if compressed_dir:
        store = CompressedStore.load(model_dir / STORE_FILE, pin=pin, progress=progress)
        stored_policy = load_policy(store.policy_yaml)
        if policy_source is not None and load_policy(policy_source).resolve(
            config.moe_layer_ids, config.num_layers, config.num_experts
        ).fingerprint() != store.fingerprint:
            raise OffloadError(
                f"{model_dir} was compressed with its own policy; serve it without --policy, "
                f"or pass the original checkpoint to use another policy."
            )
        policy_source = stored_policy
    else:
        if policy_source is not None:
            policy_source = load_policy(policy_source)
        else:
            policy_source = Policy.default_policy(config.expert_quantization)
    resolved = policy_source.resolve(config.moe_layer_ids, config.num_layers, config.num_experts)
    # Checked before the (possibly long) encoding, so a mistake in the budget fails at once.
    slot_bytes = SlotPool.slot_nbytes(config.hidden_size, config.moe_intermediate_size, config.dtype)
    all_decoded = len(config.moe_layer_ids) * config.num_experts * slot_bytes
    parse_budget(options.expert_cache if options.expert_cache is not None else "100%", all_decoded)

    if not compressed_dir:
        cached = store_cache_path(model_dir, resolved)
        if cached.is_file():
            store = CompressedStore.load(cached, pin=pin, progress=progress)
        else:
            total = len(config.moe_layer_ids) * config.num_experts
            stored = iter_stored_experts(loaded.model, loaded.checkpoint, config, keep_mxfp4=True)
            store = CompressedStore.build(stored, resolved, policy_source.to_yaml(), total, pin=pin, progress=progress)
            _save_quietly(store, cached)

    provider, budget = provider_for_store(store, config, options, device)
    return OffloadRuntime(
        options, provider, resolved, policy_source, store, provider.stats, budget, provider.pool.num_slots
    )


def provider_for_store(
    store: CompressedStore,
    config: ModelConfig,
    options: OffloadOptions,
    device: torch.device,
    timeline: bool = False,
) -> tuple[OffloadedExpertProvider, int]:
    """Slot pool, cache, filler and provider over a store already in memory; also the budget in bytes.
    Public so that benchmarks can serve a store they built without a checkpoint on disk; `timeline`
    (GPU) times copies, decodes and compute's waits with events, for the throughput benchmark."""
    # A share is of every expert as the model computes it; the slots may hold them narrower (cache.slot_dtype),
    # so the same bytes cache more of them.
    computed_bytes = SlotPool.slot_nbytes(config.hidden_size, config.moe_intermediate_size, config.dtype)
    blobs = (blob for packed in store.experts.values() for blob in packed.blobs)
    storage_dtype = slot_dtype(blobs, config.dtype, device)
    slot_bytes = SlotPool.slot_nbytes(config.hidden_size, config.moe_intermediate_size, storage_dtype)
    total_experts = len(store.experts)
    expert_cache = options.expert_cache if options.expert_cache is not None else "100%"
    budget = parse_budget(expert_cache, total_experts * computed_bytes)
    num_slots = min(budget // slot_bytes, total_experts)
    if num_slots < config.top_k:
        raise OffloadError(
            f"an expert cache of {budget} bytes holds {budget // slot_bytes} experts but one layer's top-k needs "
            f"{config.top_k}; give at least {config.top_k * slot_bytes} bytes."
        )
    stats = OffloadStats(bits_per_value={layer: s.bits_per_value for layer, s in store.layer_sizes().items()})
    pool = SlotPool(num_slots, config.hidden_size, config.moe_intermediate_size, config.dtype, device, storage_dtype)
    if device.type == "cuda":
        filler = GpuSlotFiller(pool, stats, max(p.nbytes for p in store.experts.values()), CudaStreams(device), timeline=timeline)
    else:
        filler = CpuSlotFiller(pool, stats, options.workers)
    cache = ExpertCache(num_slots, options.eviction)
    provider = OffloadedExpertProvider(
        store, pool, cache, filler, stats, config.top_k, prefetch=options.prefetch, prefetch_depth=options.prefetch_depth
    )
    return provider, budget


def _save_quietly(store: CompressedStore, path: Path) -> None:
    """The disk cache only saves time: a read-only or full disk must not stop serving."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        store.save(path)
    except OSError as exc:
        print(f"moeserve: could not cache the compressed store at {path} ({exc}); continuing.", file=sys.stderr)


def write_compressed_dir(runtime: OffloadRuntime, model, checkpoint, source_dir: Path, out_dir: Path) -> None:
    """`moeserve compress`: resident weights, the store, config and tokenizer files in one directory."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    resident = {}
    for name, _ in model.named_parameters():
        if name in checkpoint:
            resident[name] = checkpoint.get(name).contiguous()
    save_file(resident, out_dir / "resident.safetensors", metadata={"format": "pt"})
    runtime.store.save(out_dir / STORE_FILE)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source_dir / name).is_file():
            (out_dir / name).write_bytes((source_dir / name).read_bytes())
    (out_dir / "policy.yaml").write_text(runtime.store.policy_yaml)
    (out_dir / STORE_MARKER).write_text(
        json.dumps({"format": _STORE_FORMAT, "source": str(source_dir.resolve()), "policy_fingerprint": runtime.store.fingerprint})
    )
    # safetensors creates its file owner-only (0600); give every output the mode a plain write got (umask applied).
    mode = (out_dir / "policy.yaml").stat().st_mode & 0o777
    for path in (out_dir / "resident.safetensors", out_dir / STORE_FILE):
        os.chmod(path, mode)
