"""Prometheus metrics of the Redis embedding tier, read from the live tiers at scrape time.

    ugsep_embedding_cache_{hits,misses,evictions}_total{model}   hot-row cache (distinct ids)
    ugsep_embedding_cache_{bytes,max_bytes,entries,hit_ratio}{model}
    ugsep_embedding_tier_{fetches,rows_fetched,failures}_total{model}   cluster reads
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def tier_stats(repo) -> list[tuple[str, object, object]]:
    """(model, HotCacheStats, TierStats) of every served model that reads a Redis tier."""
    out = []
    for name, m in list(repo.models.items()):
        feeds = getattr(m.scorer, "store", None)
        tier = getattr(getattr(feeds, "store", None), "tier", None)
        if tier is not None:
            out.append((name, tier.cache.stats(), tier.stats()))
    return out


class TierCollector:
    """A prometheus_client collector over ``source()`` (see ``tier_stats``)."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, object, object]]]) -> None:
        self.source = source

    def describe(self):
        return []

    def collect(self):
        cache = {k: CounterMetricFamily(f"ugsep_embedding_cache_{k}", f"Hot-row cache {k}", labels=["model"])
                 for k in ("hits", "misses", "evictions")}
        gauges = {k: GaugeMetricFamily(f"ugsep_embedding_cache_{k}", f"Hot-row cache {k}", labels=["model"])
                  for k in ("bytes", "max_bytes", "entries", "hit_ratio")}
        tier = {k: CounterMetricFamily(f"ugsep_embedding_tier_{k}", f"Redis tier {k}", labels=["model"])
                for k in ("fetches", "rows_fetched", "failures")}
        for model, cs, ts in self.source():
            for k, fam in cache.items():
                fam.add_metric([model], getattr(cs, k))
            for k, fam in gauges.items():
                fam.add_metric([model], cs.hit_rate if k == "hit_ratio" else getattr(cs, k))
            for k, fam in tier.items():
                fam.add_metric([model], getattr(ts, k))
        yield from cache.values()
        yield from gauges.values()
        yield from tier.values()
