"""Ranking metrics in plain numpy: AUC (rank-based, ties averaged), log-loss, Bayes AUC.

Numpy only, so the exporter's parity code can reuse them without importing torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["auc", "log_loss", "bayes_auc", "expected_bayes_auc"]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values, and the run each sorted element belongs to
    new_run = np.r_[True, xs[1:] != xs[:-1]]
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], len(xs)]  # exclusive
    run_rank = (run_start + 1 + run_end) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = run_rank[np.cumsum(new_run) - 1]
    return ranks


def auc(label: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); tied scores count one half.

    Returns NaN when the labels hold only one class.
    """
    y = np.asarray(label).reshape(-1) > 0.5
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"auc: label has {y.size} values but score has {s.size}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(label: np.ndarray, prob: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``prob`` against 0/1 labels."""
    y = np.asarray(label, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(prob, dtype=np.float64).reshape(-1), eps, 1.0 - eps)
    if y.shape != p.shape:
        raise ValueError(f"log_loss: label has {y.size} values but prob has {p.size}")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def bayes_auc(label: np.ndarray, prob: np.ndarray) -> float:
    """AUC of the true click probabilities on the drawn labels: what no model can beat
    (in expectation) on this sample."""
    return auc(label, prob)


def expected_bayes_auc(prob: np.ndarray) -> float:
    """AUC of the true probabilities, in expectation over the label draw.

    Ratio of expectations over pairs (i, j), i != j: sum p_i (1 - p_j) [p_i > p_j]
    (+ one half for ties) over sum p_i (1 - p_j). Computed in O(n log n) by sorting.
    """
    p = np.sort(np.asarray(prob, dtype=np.float64).reshape(-1))
    q = 1.0 - p
    # for each i: sum of (1 - p_j) over j with p_j < p_i, and over j with p_j == p_i
    new_run = np.r_[True, p[1:] != p[:-1]]
    run_id = np.cumsum(new_run) - 1
    run_q = np.bincount(run_id, weights=q)
    below = np.r_[0.0, np.cumsum(run_q)[:-1]][run_id]
    tied = run_q[run_id] - q  # exclude j == i
    num = np.sum(p * (below + 0.5 * tied))
    den = p.sum() * q.sum() - np.sum(p * q)
    return float(num / den)
