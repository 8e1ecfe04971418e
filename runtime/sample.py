"""Deterministic random rows that satisfy a feature spec (for capture, parity, benchmarks)."""

from __future__ import annotations

import numpy as np

from runtime.spec import FeatureSpec, InputSpec

DEFAULT_ID_RANGE = 100  # ids drawn for integer inputs without a declared vocab


def sample_input(spec: InputSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rows of one input: ids uniform in [0, vocab), floats standard normal.

    An input declared column by column samples each column from its own domain: id
    columns uniform in their vocabulary (stored in the input's dtype), dense ones normal.
    """
    shape = (n, *spec.shape)
    if spec.fields is not None:
        return _sample_fields(spec, n, rng)
    if spec.is_integer:
        return rng.integers(0, spec.vocab or DEFAULT_ID_RANGE, size=shape).astype(spec.dtype)
    if spec.dtype == "bool":
        return rng.random(shape) < 0.5
    return rng.standard_normal(shape).astype(spec.dtype)


def _sample_fields(spec: InputSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, *spec.shape), dtype=spec.dtype)
    for f in spec.fields:
        shape = (n, *spec.shape[:-1], f.width)
        if f.is_id:
            out[..., f.start : f.stop] = rng.integers(0, f.vocab, size=shape)
        else:
            out[..., f.start : f.stop] = rng.standard_normal(shape)
    return out


def sample_rows(spec: FeatureSpec, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` independent rows of every input, keyed by spec input name."""
    rng = np.random.default_rng(seed)
    return {s.name: sample_input(s, n, rng) for s in spec.inputs}


def sample_requests(
    spec: FeatureSpec, n_requests: int, candidates: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows grouped into requests (one user, ``candidates`` items each) and their request ids.

    User inputs repeat within a request; a mixed input keeps its user columns equal
    within the request and draws its group columns per candidate.
    """
    rng = np.random.default_rng(seed)
    request_id = np.repeat(np.arange(n_requests, dtype=np.int64), candidates)
    rows: dict[str, np.ndarray] = {}
    for s in spec.inputs:
        if s.side == "group":
            rows[s.name] = sample_input(s, n_requests * candidates, rng)
            continue
        per_user = sample_input(s, n_requests, rng)[request_id]
        if s.side == "mixed":
            per_row = sample_input(s, n_requests * candidates, rng)
            cols = s.user_columns()
            per_row[..., cols] = per_user[..., cols]
            per_user = per_row
        rows[s.name] = per_user
    return rows, request_id
