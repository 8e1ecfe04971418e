"""Shared glue for the ugsep Python-backend models (copied next to each model.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils


def version_dir(args: dict) -> Path:
    """This model version's folder; puts the vendored ugsep runtime on sys.path."""
    here = Path(args["model_repository"]) / args["model_version"]
    vendored = str(here / "ugsep")
    if vendored not in sys.path:
        sys.path.insert(0, vendored)
    return here


def parameters(args: dict) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}


def error_response(e: BaseException) -> pb_utils.InferenceResponse:
    """A per-request error; bad input maps to INVALID_ARG (HTTP 400) where supported."""
    from runtime.errors import RequestError, SpecError

    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    if isinstance(e, (RequestError, SpecError)) and code is not None:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), code))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}"))


def user_key(request) -> str | None:
    """The optional ``user_key`` request parameter (namespaced for the user cache)."""
    from runtime.serving.cache import explicit_user_key

    raw = request.parameters() if hasattr(request, "parameters") else "{}"
    key = json.loads(raw or "{}").get("user_key")
    return None if key is None else explicit_user_key(key)


def execute_rankings(requests, spec, max_candidates, run, output_names, max_batch_candidates):
    """Validate every request, score all rankings with one ``run(prepared)``, respond.

    A request with bad input gets its own error; the others are still scored. A batch
    over ``max_batch_candidates`` candidates runs as several consecutive calls.
    """
    from runtime.triton.batch import chunk_by_candidates, rows_from_request, stack_rows

    responses = [None] * len(requests)
    prepared, slots = [], []
    for i, request in enumerate(requests):
        try:
            get = _getter(request)
            rows = rows_from_request(spec, get, max_candidates, user_key(request))
        except Exception as e:  # noqa: BLE001 - bad input is this request's error only
            responses[i] = error_response(e)
            continue
        slots.append((i, len(prepared), len(rows)))
        prepared += rows
    if not prepared:
        return responses
    try:
        outputs = [
            o for chunk in chunk_by_candidates(prepared, max_batch_candidates) for o in run(chunk)
        ]
    except Exception as e:  # noqa: BLE001 - every request of the failed batch learns why
        for i, _, _ in slots:
            responses[i] = error_response(e)
        return responses
    for i, start, b in slots:
        stacked = stack_rows(outputs[start : start + b], output_names)
        responses[i] = pb_utils.InferenceResponse(
            [pb_utils.Tensor(n, a) for n, a in stacked.items()]
        )
    return responses


def _getter(request):
    def get(name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    return get


class RuntimeMetrics:
    """ugsep counters in Triton's /metrics (Python-backend custom metrics), per model.

    ``ugsep_user_graph_rows_total`` / ``ugsep_users_total`` is the share of users that
    missed the user cache; ``ugsep_candidates_total`` / ``ugsep_users_total`` is the
    average fan-out the split saves on.
    """

    COUNTERS = {
        "ugsep_rankings_total": "rankings (one user + candidates) scored",
        "ugsep_candidates_total": "candidates scored",
        "ugsep_users_total": "distinct users per batch, summed over batches",
        "ugsep_user_graph_rows_total": "users run through the user graph (user-cache misses)",
    }

    def __init__(self, model_name: str) -> None:
        self.enabled = hasattr(pb_utils, "MetricFamily")
        if not self.enabled:
            return
        labels = {"model": model_name}
        self._families = {
            n: pb_utils.MetricFamily(name=n, description=d, kind=pb_utils.MetricFamily.COUNTER)
            for n, d in self.COUNTERS.items()
        }
        self._families["ugsep_user_cache_bytes"] = pb_utils.MetricFamily(
            name="ugsep_user_cache_bytes",
            description="bytes held by the user cache",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._metrics = {n: f.Metric(labels=labels) for n, f in self._families.items()}

    def observe(self, info, cache) -> None:
        """Count one batch (a ``runtime.serving.batcher.BatchInfo``)."""
        if not self.enabled:
            return
        m = self._metrics
        m["ugsep_rankings_total"].increment(info.requests)
        m["ugsep_candidates_total"].increment(info.candidates)
        m["ugsep_users_total"].increment(info.users)
        m["ugsep_user_graph_rows_total"].increment(info.users_computed)
        if cache is not None:
            m["ugsep_user_cache_bytes"].set(cache.stats().bytes)

    def close(self) -> None:
        """Metrics must go before their families (the stub's rule)."""
        if self.enabled:
            self._metrics.clear()
            self._families.clear()
