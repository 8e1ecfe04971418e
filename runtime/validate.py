"""Request validation against the feature spec, before any backend sees the data.

Every problem is a ``RequestError`` naming the input, what the spec expects and what
was found. Validation never mutates the caller's arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.errors import RequestError
from runtime.spec import FeatureSpec, InputSpec


def _as_array(spec: InputSpec, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype != np.dtype(spec.dtype):
            raise RequestError(
                f"input '{spec.name}' has dtype {arr.dtype}; the spec says {spec.dtype}"
            )
        return arr
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise RequestError(f"input '{spec.name}' is not a rectangular array: {e}") from e
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise RequestError(f"input '{spec.name}' holds non-numeric data ({arr.dtype})")
    if spec.is_integer and arr.size and arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise RequestError(f"input '{spec.name}' holds non-integer values; the spec says {spec.dtype}")
    return arr.astype(spec.dtype, copy=False)


def _check_values(spec: InputSpec, arr: np.ndarray) -> None:
    if spec.fields is not None:
        _check_field_ids(spec, arr)
    if spec.is_integer:
        if spec.vocab is not None and arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= spec.vocab:
                bad = lo if lo < 0 else hi
                raise RequestError(
                    f"input '{spec.name}' has id {bad} outside its vocabulary [0, {spec.vocab})"
                )
    elif arr.dtype.kind == "f" and arr.size and not np.all(np.isfinite(arr)):
        raise RequestError(f"input '{spec.name}' contains NaN or infinite values")


def _check_field_ids(spec: InputSpec, arr: np.ndarray) -> None:
    """Id columns (ids stored as floats too): integral, in [0, vocab); names the column."""
    for f in spec.fields:
        if not f.is_id or not arr.size:
            continue
        col = arr[..., f.start : f.stop]
        bad = ~np.isfinite(col) if col.dtype.kind == "f" else np.zeros(col.shape, bool)
        if col.dtype.kind == "f":
            bad |= np.where(np.isfinite(col), col != np.round(col), False)
        kind = "a non-integer id"
        if not bad.any():
            bad, kind = (col < 0) | (col >= f.vocab), f"an id outside its vocabulary [0, {f.vocab})"
        if bad.any():
            at = np.argwhere(bad)[0]
            column = f.start + int(at[-1])
            value = col[tuple(at)].item()
            raise RequestError(
                f"input '{spec.name}' column {column} ('{f.name}') has {kind}: {value:g}"
            )


def _check_names(kind: str, expected: list[str], got: Mapping[str, Any]) -> None:
    if not isinstance(got, Mapping):
        raise RequestError(f"{kind} features must be a mapping of input name to array")
    unknown = sorted(set(got) - set(expected))
    missing = [n for n in expected if n not in got]
    if unknown:
        raise RequestError(
            f"unknown {kind} input(s) {unknown}; expected {kind} inputs: {expected}"
        )
    if missing:
        raise RequestError(f"missing {kind} input(s) {missing}")


def check_user(spec: FeatureSpec, user: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate one user's features; returns arrays of shape [1, *spec.shape]."""
    _check_names("user", [i.name for i in spec.user_inputs], user)
    out = {}
    for s in spec.user_inputs:
        arr = _as_array(s, user[s.name])
        if arr.shape == s.shape:
            arr = arr[None]
        if arr.shape != (1, *s.shape):
            raise RequestError(
                f"user input '{s.name}' has shape {list(arr.shape)}; the spec says "
                f"{list(s.shape)} (optionally with a leading 1)"
            )
        _check_values(s, arr)
        out[s.name] = arr
    return out


def check_candidates(
    spec: FeatureSpec, candidates: Mapping[str, Any], max_candidates: int
) -> tuple[dict[str, np.ndarray], int]:
    """Validate N candidates' features; returns arrays of shape [N, *spec.shape] and N."""
    _check_names("candidate", [i.name for i in spec.group_inputs], candidates)
    out: dict[str, np.ndarray] = {}
    n = None
    for s in spec.group_inputs:
        arr = _as_array(s, candidates[s.name])
        if arr.ndim != len(s.shape) + 1 or tuple(arr.shape[1:]) != s.shape:
            raise RequestError(
                f"candidate input '{s.name}' has shape {list(arr.shape)}; the spec says "
                f"[N, {', '.join(map(str, s.shape))}]"
            )
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise RequestError(
                f"candidate input '{s.name}' has {arr.shape[0]} rows but other candidate inputs have {n}"
            )
        _check_values(s, arr)
        out[s.name] = arr
    assert n is not None
    if n == 0:
        raise RequestError("the request has no candidates (N = 0)")
    if n > max_candidates:
        raise RequestError(
            f"the request has {n} candidates; this bundle accepts at most {max_candidates} per request"
        )
    for s in spec.inputs:
        if s.side == "mixed":
            _check_mixed_user_columns(s, out[s.name])
    return out, n


def _check_mixed_user_columns(s: InputSpec, arr: np.ndarray) -> None:
    cols = s.user_columns()
    if cols and arr.shape[0] > 1:
        u = arr[..., cols]
        if not np.array_equal(u, np.broadcast_to(u[:1], u.shape)):
            raise RequestError(
                f"input '{s.name}': its user columns {cols[0]}..{cols[-1]} differ between "
                "candidates of one request; one request is one user"
            )
