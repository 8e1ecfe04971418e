"""Prometheus metrics for the server (prometheus_client, one registry per app).

    ugsep_requests_total{model}                     infer requests received
    ugsep_request_failures_total{model,reason}      bad_request, too_large, not_found, timeout,
                                                    unsupported_media_type, overloaded, busy,
                                                    unavailable, internal
    ugsep_client_disconnects_total{model}           clients that hung up before their response
    ugsep_request_latency_seconds{model}            histogram, receive -> response ready
    ugsep_queue_time_seconds{model}                 histogram, time waiting in the batcher
    ugsep_phase_seconds{model,phase}                histogram per served request and phase: decode,
                                                    validate, queue, user (user graph ran in its
                                                    batch) or cache_hit (every user cached), group,
                                                    encode (see docs/serving-protocol.md)
    ugsep_batch_requests / _users / _users_computed / _candidates{model}   per backend batch
    ugsep_cache_{hits,misses,evictions,expirations}_total{model}, ugsep_cache_{bytes,
    max_bytes,entries,hit_ratio}{model}             read from the live caches at scrape time
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from runtime.serving.batcher import BatchInfo
from runtime.serving.cache import CacheStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_PHASE = (5e-5, 1e-4, 2e-4, 5e-4, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_CANDS = (1, 10, 50, 100, 200, 500, 1000, 2000, 4000, 8000, 16000)


class ServingMetrics:
    """All server metrics in a private registry (so several apps can live in one process)."""

    def __init__(
        self,
        cache_stats: Callable[[], Iterable[tuple[str, CacheStats]]] = lambda: (),
        graph_runs: Callable[[], Iterable[tuple[str, Mapping[str, int]]]] = lambda: (),
    ) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ugsep_requests", "Infer requests received", ["model"], registry=r)
        self.failures = Counter(
            "ugsep_request_failures", "Infer requests that failed, by reason", ["model", "reason"], registry=r
        )
        self.disconnects = Counter(
            "ugsep_client_disconnects", "Clients that closed the connection before their response", ["model"], registry=r
        )
        self.latency = Histogram(
            "ugsep_request_latency_seconds", "Infer latency in the server", ["model"], buckets=_LATENCY, registry=r
        )
        self.queue_time = Histogram(
            "ugsep_queue_time_seconds", "Time a request waited in the batcher", ["model"], buckets=_LATENCY, registry=r
        )
        self.batch_requests = Histogram("ugsep_batch_requests", "Requests per batch", ["model"], buckets=_COUNTS, registry=r)
        self.batch_users = Histogram("ugsep_batch_users", "Distinct users per batch (M)", ["model"], buckets=_COUNTS, registry=r)
        self.batch_users_computed = Histogram(
            "ugsep_batch_users_computed", "Users run through the user graph per batch (cache misses)",
            ["model"], buckets=_COUNTS, registry=r,
        )
        self.batch_candidates = Histogram(
            "ugsep_batch_candidates", "Candidates per batch (N of the group call)", ["model"], buckets=_CANDS, registry=r
        )
        self.phase = Histogram(
            "ugsep_phase_seconds", "Time a served request spent in each phase", ["model", "phase"],
            buckets=_PHASE, registry=r,
        )
        self.last_inference_ms: dict[str, int] = {}
        r.register(_CacheCollector(cache_stats))
        r.register(_GraphRunCollector(graph_runs))

    def observe_batch(self, model: str, info: BatchInfo) -> None:
        self.batch_requests.labels(model).observe(info.requests)
        self.batch_users.labels(model).observe(info.users)
        self.batch_users_computed.labels(model).observe(info.users_computed)
        self.batch_candidates.labels(model).observe(info.candidates)
        user_phase = "user" if info.users_computed else "cache_hit"
        for q in info.queue_seconds:  # per request: its wait, and the batch steps it waited for
            self.queue_time.labels(model).observe(q)
            self.phase.labels(model, "queue").observe(q)
            if info.user_seconds:
                self.phase.labels(model, user_phase).observe(info.user_seconds)
            self.phase.labels(model, "group").observe(info.group_seconds)

    def observe_phase(self, model: str, phase: str, seconds: float) -> None:
        self.phase.labels(model, phase).observe(seconds)

    def success(self, model: str, seconds: float) -> None:
        """A request answered: its latency, and the time of the model's last inference."""
        self.latency.labels(model).observe(seconds)
        self.last_inference_ms[model] = int(time.time() * 1000)

    def failure(self, model: str, reason: str) -> None:
        self.failures.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _GraphRunCollector:
    """Graph runs per model and stage (user, group, group_small, full), read from the scorers
    at scrape time: which group graph served the traffic, for bundles with group_small."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, Mapping[str, int]]]]) -> None:
        self.source = source

    def describe(self):
        return []

    def collect(self):
        fam = CounterMetricFamily(
            "ugsep_graph_runs", "Compiled graph runs, by stage", labels=["model", "stage"]
        )
        for model, runs in self.source():
            for stage, n in sorted(runs.items()):
                fam.add_metric([model, stage], n)
        yield fam


class _CacheCollector:
    """Reads cache counters at scrape time, so the cache itself stays free of metrics code."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, CacheStats]]]) -> None:
        self.source = source

    def describe(self):
        return []

    def collect(self):
        counters = {k: CounterMetricFamily(f"ugsep_cache_{k}", f"User cache {k}", labels=["model"])
                    for k in ("hits", "misses", "evictions", "expirations")}
        gauges = {k: GaugeMetricFamily(f"ugsep_cache_{k}", f"User cache {k.replace('_', ' ')}", labels=["model"])
                  for k in ("bytes", "max_bytes", "entries", "hit_ratio")}
        for model, st in self.source():
            for k, fam in counters.items():
                fam.add_metric([model], getattr(st, k))
            for k, fam in gauges.items():
                fam.add_metric([model], st.hit_rate if k == "hit_ratio" else getattr(st, k))
        yield from counters.values()
        yield from gauges.values()
