"""GET /metrics of a scale-out application: every live replica's `moeserve:*` metrics in one scrape, each
sample labelled with its `replica`.

In:  per replica id, the Prometheus text its app's /metrics rendered (pushed to the Board at each sync,
     so at most SYNC_SECONDS old).
Out: one valid exposition: each family once, with the samples of every replica. Nothing is summed here:
     counters and histograms add up across replicas with `sum without (replica)`, while gauges such as
     `kv_cache_usage_perc` or `expert_bits_per_value` do not, so the choice stays with the query.
     `moeserve:replicas_live` counts the replicas the scrape covers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample


def merge_replica_metrics(texts: dict[str, bytes]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(texts))
    return generate_latest(registry)


class _Merged(Collector):
    def __init__(self, texts: dict[str, bytes]):
        self._texts = texts

    def collect(self):
        live = GaugeMetricFamily("moeserve:replicas_live", "Replicas this scrape covers (synced recently).")
        live.add_metric([], len(self._texts))
        yield live
        families: dict[str, Metric] = {}
        for replica, text in sorted(self._texts.items()):
            for family in text_string_to_metric_families(text.decode()):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                merged.samples += [
                    Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                    for s in family.samples
                ]
        yield from families.values()
