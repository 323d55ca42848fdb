"""Prometheus metrics, named `moeserve:*` after vLLM's, each labelled with the served `model_name`.

In:  request events from the async engine (event loop thread): tokens, latencies, finish reasons;
     at scrape time, the in-flight requests and every policy generation's `OffloadStats`.
Out: GET /metrics in the Prometheus text format, from a registry owned by one app (so several
     apps in one process, as in tests, do not collide).

Offloading counters sum over every policy generation a variant has served with, so they only go
up across a policy switch; `moeserve:expert_bits_per_value` shows the current generation's store.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
_MODEL = ["model_name"]
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)

# OffloadStats field → (metric name without the prefix, help)
_OFFLOAD_COUNTERS = {
    "hits": ("expert_cache_hits", "Routed experts found in the decoded-expert cache."),
    "misses": ("expert_cache_misses", "Routed experts loaded on demand."),
    "prefetches_issued": ("expert_prefetches_issued", "Experts loaded ahead of time on a router prediction."),
    "prefetches_used": ("expert_prefetches_used", "Prefetched experts that a later step used."),
    "bytes_transferred": ("expert_bytes_transferred", "Compressed expert bytes moved to the decoder (H2D on a GPU)."),
    "decode_seconds": ("expert_decode_seconds", "Time spent decoding experts, summed over workers."),
    "wait_seconds": ("expert_wait_seconds", "Time the model waited for an expert to be ready."),
    "prefetch_bytes": ("expert_prefetch_bytes", "Compressed bytes moved for prefetched experts."),
    "prefetch_bytes_wasted": ("expert_prefetch_bytes_wasted", "Prefetched bytes evicted before any step used them."),
}


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_success = Counter(
            "moeserve:request_success", "Finished sequences by finish reason.", _MODEL + ["finished_reason"], registry=r
        )
        self.prompt_tokens = Counter("moeserve:prompt_tokens", "Prompt tokens prefilled.", _MODEL, registry=r)
        self.generation_tokens = Counter("moeserve:generation_tokens", "Tokens generated.", _MODEL, registry=r)
        self.ttft = Histogram(
            "moeserve:time_to_first_token_seconds", "Arrival to first token.", _MODEL, buckets=_TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "moeserve:inter_token_latency_seconds",
            "Time between two tokens of a sequence.",
            _MODEL,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "moeserve:e2e_request_latency_seconds",
            "Arrival to last token.",
            _MODEL,
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "moeserve:request_queue_time_seconds",
            "Arrival to the start of the request's first step.",
            _MODEL,
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )

    def watch(self, counts: Callable[[], dict[str, tuple[int, int]]], variants: Callable[[], Iterable]) -> None:
        """Gauges and offloading counters read at scrape time from the engine and the variants."""
        self.registry.register(_ScrapeCollector(counts, variants))

    def watch_kv(self, kv_stats: Callable[[], dict[str, float]], model_name: str) -> None:
        """The KV cache's gauges and preemptions, read at scrape time (one cache serves every variant)."""
        self.registry.register(_KvCollector(kv_stats, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ScrapeCollector(Collector):
    def __init__(self, counts, variants):
        self._counts, self._variants = counts, variants

    def describe(self):
        return []  # dynamic label sets: describe nothing, collect at scrape time

    def collect(self):
        variants = list(self._variants())
        counts = self._counts()
        running = GaugeMetricFamily(
            "moeserve:num_requests_running", "Requests with a generated token, unfinished.", labels=_MODEL
        )
        waiting = GaugeMetricFamily("moeserve:num_requests_waiting", "Requests admitted, no token yet.", labels=_MODEL)
        for variant in variants:
            r, w = counts.get(variant.name, (0, 0))
            running.add_metric([variant.name], r)
            waiting.add_metric([variant.name], w)
        yield running
        yield waiting
        families = {
            field: CounterMetricFamily(f"moeserve:{name}", help_text, labels=_MODEL)
            for field, (name, help_text) in _OFFLOAD_COUNTERS.items()
        }
        bits = GaugeMetricFamily(
            "moeserve:expert_bits_per_value",
            "Stored bits per expert weight, per MoE layer, current policy.",
            labels=_MODEL + ["layer"],
        )
        for variant in variants:
            if not variant.stats:
                continue  # experts resident and uncompressed: no offloading
            for field, value in variant.offload_totals().items():
                families[field].add_metric([variant.name], value)
            for layer, value in sorted(variant.current.bits_per_value.items()):
                bits.add_metric([variant.name, str(layer)], value)
        yield from families.values()
        yield bits


class _KvCollector(Collector):
    def __init__(self, kv_stats, model_name: str):
        self._stats, self._labels = kv_stats, [model_name]

    def describe(self):
        return []

    def collect(self):
        stats = self._stats()
        gauges = (
            ("kv_cache_usage_perc", "kv_cache_usage_perc", "Share of the KV cache's blocks in use (1 = full)."),
            ("kv_cache_blocks_in_use", "kv_blocks_in_use", "KV cache blocks held by sequences."),
            ("kv_cache_blocks_free", "kv_blocks_free", "KV cache blocks free."),
        )
        for name, key, help_text in gauges:
            gauge = GaugeMetricFamily(f"moeserve:{name}", help_text, labels=_MODEL)
            gauge.add_metric(self._labels, stats[key])
            yield gauge
        preemptions = CounterMetricFamily(
            "moeserve:num_preemptions", "Running sequences preempted (their KV recomputed later) to free blocks.",
            labels=_MODEL,
        )
        preemptions.add_metric(self._labels, stats["num_preemptions"])
        yield preemptions
        for name, key, help_text in (
            ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
            ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed again)."),
        ):
            counter = CounterMetricFamily(f"moeserve:{name}", help_text, labels=_MODEL)
            counter.add_metric(self._labels, stats[key])
            yield counter
