"""Triton requests <-> ugsep requests: pure numpy, shared by the Python-backend models.

Wire format of the top-level model (CPU model and GPU orchestrator alike). Triton's
batch dimension counts *rankings* (one user + its candidates), so a request with
batch B carries

    user input       [B, *shape]          (spec side "user")
    candidate input  [B, N, *shape]       (spec side "group" / "mixed")
    output           [B, N, ...]

and usually B = 1. Candidate inputs are declared ``allow_ragged_batch`` so Triton's
dynamic batcher may put requests with different N into one ``execute`` call; the
model turns all rows of all requests into ugsep ``Prepared`` requests and scores them
together (one user call, one group call).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from runtime.errors import RequestError
from runtime.scorer import Prepared
from runtime.spec import FeatureSpec
from runtime.validate import check_candidates, check_user


def prepare(spec: FeatureSpec, user: Mapping, candidates: Mapping, max_candidates: int) -> Prepared:
    """Validate one ranking (user [1, ...], candidates [N, ...]) as ``Scorer.prepare`` does."""
    u = check_user(spec, user)
    c, n = check_candidates(spec, candidates, max_candidates)
    for s in spec.inputs:
        if s.side == "mixed":  # the user graph reads a mixed input's first row
            u[s.name] = c[s.name][:1]
    return Prepared(u, c, n)


def rows_from_request(
    spec: FeatureSpec,
    get: Callable[[str], np.ndarray | None],
    max_candidates: int,
    user_key: str | None = None,
) -> list[Prepared]:
    """The B rankings of one Triton request, validated (RequestError names the problem)."""
    user = {s.name: _fetch(get, s.name) for s in spec.user_inputs}
    cands = {s.name: _fetch(get, s.name) for s in spec.group_inputs}
    batch = {a.shape[0] if a.ndim else -1 for a in (*user.values(), *cands.values())}
    if len(batch) != 1 or -1 in batch:
        raise RequestError(
            f"every input needs the same leading (batch) dimension; got {sorted(batch)}"
        )
    for name, arr in cands.items():
        if arr.ndim < 2:
            raise RequestError(
                f"candidate input '{name}' has shape {list(arr.shape)}; expected "
                f"[batch, candidates, ...] (batch = rankings in this request, usually 1)"
            )
    (b,) = batch
    if user_key is not None and b != 1:
        raise RequestError(
            f"parameter 'user_key' names one user, but this request holds {b} rankings"
        )
    rows = []
    for j in range(b):
        p = prepare(
            spec,
            {k: v[j : j + 1] for k, v in user.items()},
            {k: v[j] for k, v in cands.items()},
            max_candidates,
        )
        p.user_key = user_key
        rows.append(p)
    return rows


def _fetch(get: Callable[[str], np.ndarray | None], name: str) -> np.ndarray:
    arr = get(name)
    if arr is None:
        raise RequestError(f"input '{name}' is missing from the request")
    return arr


def stack_rows(
    outputs: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per-ranking outputs [N, ...] of one request -> [B, N, ...] per output name."""
    return {n: np.ascontiguousarray(np.stack([o[n] for o in outputs])) for n in names}


def chunk_by_candidates(prepared: Sequence[Prepared], limit: int) -> list[list[Prepared]]:
    """Consecutive groups whose candidate total stays within ``limit`` (one ranking may exceed it).

    Triton bounds a dynamic batch by rankings (max_batch_size), not by candidates; this
    bounds the group call's size so memory stays predictable.
    """
    chunks: list[list[Prepared]] = []
    total = 0
    for p in prepared:
        if not chunks or total + p.n > limit:
            chunks.append([])
            total = 0
        chunks[-1].append(p)
        total += p.n
    return chunks
