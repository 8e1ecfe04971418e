"""Triton's statistics extension (``/v2/models[/{m}[/versions/{v}]]/stats``, gRPC ``ModelStatistics``).

Read at request time from the server's Prometheus registry, so the two never disagree:

    inference_count / success   answered infer requests; ns = their summed latency
    fail                        failed infer requests (all reasons)
    execution_count             backend batches run
    queue                       time in the batcher queue
    compute_input               decode + validate phases
    compute_infer               user graph (or cache hit) + group graph phases
    compute_output              encode phase
    cache_hit / cache_miss      user cache lookups (count; ns is 0: the lookups are timed in
                                compute_infer)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from runtime.serving.metrics import ServingMetrics
from runtime.serving.repository import ModelRepository

_PHASES = {"compute_input": ("decode", "validate"), "compute_infer": ("user", "cache_hit", "group"),
           "compute_output": ("encode",), "queue": ("queue",)}


def _samples(metrics: ServingMetrics) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of the whole registry."""
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in metrics.registry.collect():
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def _duration(count: float, seconds: float) -> dict[str, int]:
    return {"count": int(count), "ns": int(round(seconds * 1e9))}


def model_statistics(samples: dict, metrics: ServingMetrics, name: str, version: str) -> dict[str, Any]:
    """One model's entry of ``model_stats``."""
    m = (("model", name),)

    def value(sample: str, *labels) -> float:
        return samples.get(sample, {}).get(tuple(sorted(m + labels)), 0.0)

    def phases(names) -> dict[str, int]:
        return _duration(sum(value("ugsep_phase_seconds_count", ("phase", p)) for p in names),
                         sum(value("ugsep_phase_seconds_sum", ("phase", p)) for p in names))

    failed = sum(v for k, v in samples.get("ugsep_request_failures_total", {}).items() if ("model", name) in k)
    success = value("ugsep_request_latency_seconds_count")
    stats = {
        "success": _duration(success, value("ugsep_request_latency_seconds_sum")),
        "fail": _duration(failed, 0.0),
        **{k: phases(v) for k, v in _PHASES.items()},
        "cache_hit": _duration(value("ugsep_cache_hits_total"), 0.0),
        "cache_miss": _duration(value("ugsep_cache_misses_total"), 0.0),
    }
    return {
        "name": name, "version": version, "last_inference": metrics.last_inference_ms.get(name, 0),
        "inference_count": int(success), "execution_count": int(value("ugsep_batch_requests_count")),
        "inference_stats": stats, "batch_stats": [],
    }


def statistics(repo: ModelRepository, metrics: ServingMetrics, name: str | None, version: str | None) -> dict:
    """``{"model_stats": [...]}`` for one model (404 if not loaded) or every loaded model."""
    from runtime.serving.app import resolve

    models = [resolve(repo, name, version)] if name else list(repo.models.values())
    samples = _samples(metrics)
    return {"model_stats": [model_statistics(samples, metrics, m.name, m.version) for m in models]}
