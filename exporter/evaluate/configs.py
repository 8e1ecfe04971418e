"""Parity in the configurations the server runs: per request, merged, batch 1, batch max.

A server does not score a request the way one big parity batch does. The dynamic
batcher merges concurrent requests into one user call and one group call
(``runtime.serving.batcher.run_batch``), cuts large group calls into chunks, and a
lone request of one candidate is a call of one row. For a row-wise bundle each of these
must give the eager model's scores for the request alone; for a request-scoped bundle
(``manifest.row_scope``) the runtime never merges or cuts a request's group call, so its
configurations are per request and merged (user side batched, group per request).

Every configuration is compared with the EAGER model run per request
(``eager_per_request``); ``config_runs`` yields (name, description, outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from runtime.scorer import Prepared, Scorer
from runtime.spec import FeatureSpec

Rows = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
MERGE_REQUESTS = 8  # requests per merged batch (a busy server's batch)
BATCH1_ROWS = 2000  # batch-1 scores this many rows at most (one call per row)


def request_chunks(groups: list[np.ndarray], max_rows: int) -> Iterator[np.ndarray]:
    """Row indices of consecutive whole requests, at most ``max_rows`` rows per chunk
    (a larger request is a chunk of its own)."""
    chunk: list[np.ndarray] = []
    size = 0
    for g in groups:
        if chunk and size + len(g) > max_rows:
            yield np.concatenate(chunk)
            chunk, size = [], 0
        chunk.append(g)
        size += len(g)
    if chunk:
        yield np.concatenate(chunk)


def run_in_chunks(run: Callable[[Rows], Outputs], rows: Rows, chunks) -> Outputs:
    """``run`` on each chunk of row indices; outputs put back in row order."""
    n = len(next(iter(rows.values())))
    out: Outputs = {}
    for idx in chunks:
        got = run({k: v[idx] for k, v in rows.items()})
        for k, v in got.items():
            if k not in out:
                out[k] = np.zeros((n, *v.shape[1:]), dtype=v.dtype)
            out[k][idx] = v
    return out


def eager_per_request(run_eager: Callable[[Rows], Outputs], rows: Rows, groups) -> Outputs:
    """The reference: the eager model called once per request, on that request's rows only."""
    return run_in_chunks(run_eager, rows, groups)


def _prepared(scorer: Scorer, spec: FeatureSpec, rows: Rows, idx: np.ndarray) -> Prepared:
    from exporter.evaluate.stages import user_rows

    part = {k: v[idx] for k, v in rows.items()}
    users, _ = user_rows(spec, part)
    user = {k: v[:1] for k, v in users.items()}
    return Prepared(user, {s.name: part[s.name] for s in spec.group_inputs}, len(idx))


def config_runs(
    scorer: Scorer, spec: FeatureSpec, rows: Rows, groups: list[np.ndarray], *, group_chunk: int = 256
) -> Iterator[tuple[str, str, Outputs]]:
    """(name, what it is, outputs) for each configuration the server uses for ``scorer``."""
    from exporter.evaluate.stages import _scorer_runner
    from runtime.serving.batcher import run_batch

    run = _scorer_runner(scorer, spec)
    n = len(next(iter(rows.values())))
    yield "per-request", "each request alone in one call", run_in_chunks(run, rows, groups)

    def merged(part_groups):
        prepared = [_prepared(scorer, spec, rows, g) for g in part_groups]
        return run_batch(scorer, None, prepared, group_chunk)[0]

    out: Outputs = {}
    for lo in range(0, len(groups), MERGE_REQUESTS):
        part = groups[lo : lo + MERGE_REQUESTS]
        for g, got in zip(part, merged(part), strict=True):
            for k, v in got.items():
                out.setdefault(k, np.zeros((n, *v.shape[1:]), dtype=v.dtype))[g] = v
    what = f"{MERGE_REQUESTS} requests per batch through the server's batcher"
    if scorer.request_scoped:
        yield "merged", what + " (request-scoped: one group call per request)", out
        return
    yield "merged", what + f" (group calls cut at {group_chunk})", out
    m = min(n, BATCH1_ROWS)
    one = run_in_chunks(run, {k: v[:m] for k, v in rows.items()}, [np.array([i]) for i in range(m)])
    yield "batch-1", f"one candidate per call (first {m} rows)", one
    big = int(scorer.max_candidates)
    chunks = [np.arange(lo, min(n, lo + big)) for lo in range(0, n, big)]
    yield "batch-max", f"calls of {big} rows (the bundle's max_candidates) across requests", (
        run_in_chunks(run, rows, chunks)
    )
