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
