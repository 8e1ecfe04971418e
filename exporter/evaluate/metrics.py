"""Parity metrics in plain numpy: element errors, AUC / log-loss, per-request ranking agreement.

Everything here is a pure function of arrays; no torch, no backends. Scores are
compared in float64 so the metrics themselves add no rounding of their own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

EPS = 1e-12
LOGLOSS_CLIP = 1e-7
TOPK = (10, 50)
PERCENTILES = (5, 50, 95)


def _flat(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(len(a), -1) if np.ndim(a) else np.asarray(a)


def element_errors(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Max / mean absolute and relative error and cosine similarity of two same-shape arrays."""
    ref = np.asarray(ref, dtype=np.float64).ravel()
    got = np.asarray(got, dtype=np.float64).ravel()
    if ref.shape != got.shape:
        raise ValueError(f"cannot compare arrays of {ref.size} and {got.size} elements")
    diff = np.abs(got - ref)
    rel = diff / np.maximum(np.abs(ref), EPS)
    nonfinite = int(np.count_nonzero(~np.isfinite(got)))
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "max_rel": float(rel.max()) if rel.size else 0.0,
        "mean_rel": float(rel.mean()) if rel.size else 0.0,
        "cosine": cosine(ref, got),
        "nonfinite": nonfinite,
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened arrays (1.0 when both are all zero)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(xs)]])
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula; a tie between classes counts one half.

    NaN when only one class is present.
    """
    y = np.asarray(labels).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def as_probability(scores: np.ndarray) -> np.ndarray:
    """Scores as probabilities: kept when all lie in [0, 1], else read as logits (sigmoid)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size and (s.min() < 0.0 or s.max() > 1.0):
        return 1.0 / (1.0 + np.exp(-s))
    return s


def log_loss(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [1e-7, 1 - 1e-7])."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(as_probability(scores), LOGLOSS_CLIP, 1.0 - LOGLOSS_CLIP)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def topk_overlap(ref: np.ndarray, got: np.ndarray, k: int) -> float:
    """|top-k(ref) ∩ top-k(got)| / k, ties broken by position (stable sort) on both sides."""
    ref = np.asarray(ref, dtype=np.float64).ravel()
    got = np.asarray(got, dtype=np.float64).ravel()
    top_ref = np.argsort(-ref, kind="stable")[:k]
    top_got = np.argsort(-got, kind="stable")[:k]
    return len(np.intersect1d(top_ref, top_got)) / float(k)


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall tau-b over all pairs (ties handled); 1.0 when either side is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    iu = np.triu_indices(len(a), k=1)
    da = np.sign(a[:, None] - a[None, :])[iu]
    db = np.sign(b[:, None] - b[None, :])[iu]
    n_a, n_b = np.count_nonzero(da), np.count_nonzero(db)
    if n_a == 0 or n_b == 0:
        return 1.0 if n_a == n_b else 0.0
    return float(np.sum(da * db) / np.sqrt(float(n_a) * float(n_b)))


def distribution(values: Iterable[float]) -> dict[str, float] | None:
    """Mean, min and percentiles of a list of per-request values (None when empty)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return None
    out = {"n": int(v.size), "mean": float(v.mean()), "min": float(v.min())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(v, p))
    return out


def request_groups(request_ids: np.ndarray) -> list[np.ndarray]:
    """Row indices of each request, in order of first appearance."""
    rid = np.asarray(request_ids).ravel()
    _, first, inverse = np.unique(rid, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    return [np.flatnonzero(inverse == g) for g in order]


def ranking_metrics(
    ref: np.ndarray, got: np.ndarray, groups: list[np.ndarray], ks: tuple[int, ...] = TOPK
) -> dict[str, dict[str, float] | None]:
    """Per-request top-k overlap (for requests with more than k candidates) and Kendall tau."""
    ref = _flat(ref)[:, 0] if np.ndim(ref) > 1 else np.asarray(ref, dtype=np.float64)
    got = _flat(got)[:, 0] if np.ndim(got) > 1 else np.asarray(got, dtype=np.float64)
    out: dict[str, dict[str, float] | None] = {}
    for k in ks:
        out[f"top{k}_overlap"] = distribution(
            topk_overlap(ref[g], got[g], k) for g in groups if len(g) > k
        )
    out["kendall_tau"] = distribution(kendall_tau(ref[g], got[g]) for g in groups if len(g) > 1)
    return out


def label_metrics(labels: np.ndarray, ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """AUC and log-loss of reference and stage, and stage minus reference."""
    ref1 = _flat(ref)[:, 0] if np.ndim(ref) > 1 else ref
    got1 = _flat(got)[:, 0] if np.ndim(got) > 1 else got
    a_ref, a_got = auc(labels, ref1), auc(labels, got1)
    l_ref, l_got = log_loss(labels, ref1), log_loss(labels, got1)
    return {
        "auc_ref": a_ref,
        "auc": a_got,
        "delta_auc": a_got - a_ref,
        "logloss_ref": l_ref,
        "logloss": l_got,
        "delta_logloss": l_got - l_ref,
    }


def output_metrics(ref: np.ndarray, got: np.ndarray, labels, groups) -> dict[str, Any]:
    """All metrics of one output: element errors; label metrics with the ΔAUC's 95% interval
    (paired bootstrap over requests, exporter.evaluate.auc_noise); the logit error relative
    to the score spread; per-request ranking."""
    from exporter.evaluate import auc_noise as _auc_noise

    if ref.shape != got.shape:
        return {"shape_mismatch": f"reference {list(ref.shape)} vs stage {list(got.shape)}"}
    out: dict[str, Any] = element_errors(ref, got)
    scalar = ref.ndim == 1 or (ref.ndim == 2 and ref.shape[1] == 1)
    if scalar and np.all(np.isfinite(got)):
        out["logit_rel_rms"] = _auc_noise.logit_rel_rms(ref, got)
        if labels is not None:
            lm = label_metrics(labels, ref, got)
            lm["abs_delta_auc"] = abs(lm["delta_auc"])
            lm["abs_delta_logloss"] = abs(lm["delta_logloss"])
            lm["delta_auc_ci"] = _auc_noise.delta_auc_interval(labels, ref, got, groups)
            out.update(lm)
        out.update(ranking_metrics(ref, got, groups))
    return out
