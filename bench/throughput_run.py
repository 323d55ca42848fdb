"""One workload of bench/throughput.py through configurations (a) to (d), on one engine.

In:  a `Workload` (resident model + a pass over its experts), budgets, batch sizes, the policy of the
     compressed store, the compute device and the link bandwidth measured at the start of the run.
Out: the workload's result dict: its shapes, host memory of each expert copy, and one row per
     (configuration, budget, batch) as `throughput_measure.row` makes it.

Memory is held one configuration at a time: the resident experts are freed before the bf16 host copies
are made, and those before the compressed store is built, so the peak is the largest of the three.
"""

from __future__ import annotations

import gc
import time

import torch

from throughput_baseline import NaiveOffloadProvider, host_copies
from throughput_measure import row, timed_request
from throughput_models import Workload

from moeserve.devices import empty_host_cache
from moeserve.engine.llm_engine import LLMEngine
from moeserve.experts import DenseExpertProvider, stack_experts
from moeserve.offload.cache import SlotPool
from moeserve.offload.options import OffloadOptions
from moeserve.offload.policy import Policy
from moeserve.offload.runtime import parse_budget, provider_for_store
from moeserve.offload.store import CompressedStore

WARMUP_PROMPT, WARMUP_TOKENS = 16, 4  # per configuration and batch: first-use allocations and kernels
GiB = 2**30
# Left free beside the resident experts: KV cache, a 4096-token prefill's activations, allocator slack.
DEVICE_HEADROOM = 4 * GiB


class WorkloadRun:
    def __init__(
        self, workload: Workload, budgets: list[str], batches: list[int], prompt_len: int, new_tokens: int,
        device: torch.device, bandwidth: float, seed: int, prefetch_depth: int | None = None,
    ):
        self.workload, self.config = workload, workload.config
        self.budgets, self.batches, self.new_tokens = budgets, batches, new_tokens
        self.device, self.bandwidth, self.seed = device, bandwidth, seed
        self.prefetch_depth = prefetch_depth  # (d)'s; None: automatic
        self.total_bytes = workload.num_experts_total * workload.expert_nbytes
        # One engine (model + KV cache) for every configuration: each request names its expert provider,
        # so there is no default one. One step prefills every prompt of the largest batch.
        self.engine = LLMEngine(
            workload.model, None, device, max_model_len=prompt_len + new_tokens + 1,
            max_num_seqs=max(batches), max_num_batched_tokens=max(batches) * prompt_len,
        )
        generator = torch.Generator().manual_seed(seed)
        vocab = self.config.vocab_size
        self.prompts = {b: torch.randint(vocab, (b, prompt_len), generator=generator).tolist() for b in batches}
        self.warmups = {b: torch.randint(vocab, (b, WARMUP_PROMPT), generator=generator).tolist() for b in batches}
        self.slots = {
            b: min(parse_budget(b, self.total_bytes) // workload.expert_nbytes, workload.num_experts_total)
            for b in budgets
        }
        self.usable = [b for b in budgets if self.slots[b] >= self.config.top_k]
        self.skipped = [
            f"budget {b}: {self.slots[b]} slots cannot hold one layer's top-{self.config.top_k}"
            for b in budgets if b not in self.usable
        ]
        self.rows: list[dict] = []
        self._engine_warm = False
        self.info: dict = {}

    def run(self, policy: Policy) -> dict:
        self.resident()
        self.naive()
        self.compressed(policy)
        c = self.config
        return {
            "name": self.workload.name, "source": self.workload.source, "model_type": c.model_type,
            "moe_layers": len(c.moe_layer_ids), "num_experts": c.num_experts, "top_k": c.top_k,
            "hidden_size": c.hidden_size, "expert_intermediate_size": c.moe_intermediate_size,
            "dtype": str(c.dtype).removeprefix("torch."), "expert_bytes": self.workload.expert_nbytes,
            "prompt_len": len(self.prompts[self.batches[0]][0]), "new_tokens": self.new_tokens,
            "slots": {b: self.slots[b] for b in self.usable}, **self.info,
            "rows": self.rows, "skipped": self.skipped,
        }

    def measure(self, name: str, budget: str, provider, stats) -> None:
        for batch in self.batches:
            if not self._engine_warm:  # once, full size: KV cache growth and every GEMM shape of the run
                self._request(provider, stats, self.prompts[max(self.batches)], WARMUP_TOKENS, self.seed + 1)
                self._engine_warm = True
            self._request(provider, stats, self.warmups[batch], WARMUP_TOKENS, self.seed + 1)
            m = self._request(provider, stats, self.prompts[batch], self.new_tokens, self.seed)
            r = row(name, budget, m, self.bandwidth)
            self.rows.append(r)
            print(f"  {name:<13} {budget:>4} batch {batch}: {r['tokens_per_s']:9.2f} tok/s, "
                  f"TTFT {r['ttft_s']:7.3f} s, {r['bytes_per_token'] / 2**20:9.2f} MiB/token, "
                  f"wait {r['wait_ms_per_token']:7.2f} ms/token", flush=True)

    def _request(self, provider, stats, prompts, new_tokens, seed):
        return timed_request(self.engine, provider, stats, prompts, new_tokens, seed, self.device)

    def resident(self) -> None:
        """(a): every expert in the compute dtype on the device, if it fits."""
        if not fits_on_device(self.total_bytes, self.device):
            self.skipped.append(f"(a) resident: {self.total_bytes / GiB:.1f} GiB of experts do not fit on the device")
            return
        c = self.config
        provider = DenseExpertProvider.from_stacked({  # as the loader holds resident experts on a GPU
            layer: stack_experts(weights, c.num_experts, c.moe_intermediate_size, c.hidden_size, self.device, c.dtype)
            for layer, weights in self.workload.experts()
        })
        self.measure("a resident", "all", provider, None)
        del provider
        release(self.device)

    def naive(self) -> None:
        """(b): uncompressed host copies (the stored dtype), LRU slots, synchronous copy on a miss."""
        c = self.config
        start = time.perf_counter()
        host = host_copies(self.workload.experts(), pin=self.device.type == "cuda")
        self.info["naive_host_bytes"] = sum(t.numel() * t.element_size() for t in host.values())
        self.info["naive_build_s"] = time.perf_counter() - start
        for budget in self.usable:
            pool = SlotPool(self.slots[budget], c.hidden_size, c.moe_intermediate_size, c.dtype, self.device)
            provider = NaiveOffloadProvider(host, pool)
            self.measure("b naive", budget, provider, provider.stats)
            del provider, pool
            release(self.device)
        del host
        release(self.device)

    def compressed(self, policy: Policy) -> None:
        """(c) and (d): the compressed store behind the engine's offloading runtime, prefetch off and on."""
        c = self.config
        resolved = policy.resolve(c.moe_layer_ids, c.num_layers, c.num_experts)
        start = time.perf_counter()
        store = CompressedStore.build(
            self.workload.experts(), resolved, policy.to_yaml(), self.workload.num_experts_total,
            pin=self.device.type == "cuda", progress=False,
        )
        sizes = store.layer_sizes().values()
        self.info.update(
            store_host_bytes=store.nbytes,
            store_build_s=time.perf_counter() - start,
            bits_per_value=8 * sum(s.nbytes for s in sizes) / sum(s.numel for s in sizes),
        )
        print(f"  host copies: bf16 {self.info['naive_host_bytes'] / GiB:.2f} GiB, compressed "
              f"{store.nbytes / GiB:.2f} GiB ({self.info['bits_per_value']:.2f} bits/value, "
              f"built in {self.info['store_build_s']:.1f} s)", flush=True)
        for budget in self.usable:
            for name, prefetch in (("c compressed", False), ("d +prefetch", True)):
                depth = self.prefetch_depth if prefetch else None
                options = OffloadOptions(expert_cache=budget, prefetch=prefetch, prefetch_depth=depth)
                provider, _ = provider_for_store(store, c, options, self.device, timeline=True)
                self.measure(name, budget, provider, provider.stats)
                provider.close()
                del provider
                release(self.device)
        del store
        release(self.device)


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # on a CPU every configuration lives in host memory anyway
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes + DEVICE_HEADROOM <= free


def release(device: torch.device) -> None:
    """Return freed configurations' memory before the next one allocates (pinned host memory too)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        empty_host_cache()  # torch's pinned-host caching allocator keeps freed blocks otherwise
