"""How sure a ΔAUC is: its uncertainty, and a verdict that knows it.

A quantized stage and the eager model score the SAME rows, so their AUCs are strongly
correlated and their difference is far less noisy than either AUC; but a budget of
|ΔAUC| ≤ 1e-4 still sits at or below the noise of a few thousand rows. Rows of one
request share a user, so the uncertainty is estimated by a paired bootstrap over
requests (each resample draws whole requests; both AUCs are recomputed on the same
draw): ``delta_auc_interval``.

``judge_auc`` is the one rule the parity verdict and the W8 selection (exporter.steps.quantize)
apply to the |ΔAUC| budget:

- resolved pass: ``|ΔAUC| + z·se ≤ budget`` (the whole interval inside the budget);
- resolved breach: ``|ΔAUC| − z·se > budget`` (the whole interval outside);
- otherwise the rows cannot resolve the budget, and a criterion they can resolve decides:
  the logit error relative to the score spread, ``rms(Δlogit) / std(logit_ref)``, at most
  ``logit_tolerance(budget)``. Under a binormal score model with independent errors of
  relative size ε, AUC = Φ(δ/√2) falls by ≈ φ(x)·x·ε²/2 (x = δ/√2), at most 0.121·ε²;
  the tolerance ``sqrt(budget / 0.242)`` keeps that expected loss at half the budget
  (ε ≤ 0.020 for 1e-4). Per-request top-k overlap keeps its own budget alongside.

The selection judges on calibration rows but must predict the verdict on held-out rows:
it widens the interval by the held-out rows' own noise (``predictive_se``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z = 1.96  # two-sided 95% interval
N_BOOT = 400
MAX_BLOCKS = 256
BINORMAL_MAX_SLOPE = 0.121  # max over x of phi(x)*x/2: d AUC / d eps^2


def logit_tolerance(budget: float) -> float:
    """Largest logit error relative to the score spread whose expected |ΔAUC| ≤ budget / 2."""
    return math.sqrt(budget / (2 * BINORMAL_MAX_SLOPE))


def as_logits(scores: np.ndarray) -> np.ndarray:
    """Scores as logits: probabilities in [0, 1] are mapped through the logit, else kept."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size and s.min() >= 0.0 and s.max() <= 1.0:
        p = np.clip(s, 1e-7, 1 - 1e-7)
        return np.log(p) - np.log1p(-p)
    return s


def logit_rel_rms(ref: np.ndarray, got: np.ndarray) -> float:
    """rms(logit(got) − logit(ref)) / std(logit(ref)): the error relative to the score spread."""
    r, g = as_logits(ref), as_logits(got)
    spread = float(np.std(r))
    err = float(np.sqrt(np.mean((g - r) ** 2))) if r.size else 0.0
    return err / spread if spread > 0 else (0.0 if err == 0 else float("inf"))


def _pair_matrix(y: np.ndarray, s: np.ndarray, block: np.ndarray, k: int) -> np.ndarray:
    """M[a, b]: (positive of block a, negative of block b) pairs ordered right by ``s``
    (a tie counts one half). AUC under block weights c is cᵀMc / ((c·P)(c·N))."""
    pos = y == 1
    by_score = np.argsort(s[pos], kind="mergesort")  # sorted needles search faster
    s_pos, b_pos = s[pos][by_score], block[pos][by_score]
    s_neg, b_neg = s[~pos], block[~pos]
    order = np.lexsort((s_neg, b_neg))  # negatives by block, sorted within each
    per_block = np.split(s_neg[order], np.cumsum(np.bincount(b_neg, minlength=k))[:-1])
    m = np.zeros((k, k))
    for b, neg in enumerate(per_block):
        if neg.size:
            lo = np.searchsorted(neg, s_pos, "left")
            hi = np.searchsorted(neg, s_pos, "right")
            m[:, b] = np.bincount(b_pos, weights=0.5 * (lo + hi), minlength=k)
    return m


def delta_auc_interval(
    labels: np.ndarray,
    ref: np.ndarray,
    got: np.ndarray,
    groups: list[np.ndarray],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Paired bootstrap over requests of AUC(got) − AUC(ref): {se, ci_low, ci_high, ...}.

    Requests are resampled whole (consecutive requests pooled into at most ``MAX_BLOCKS``
    blocks, a coarser cluster bootstrap); both AUCs come from the same draw. None when
    there are fewer than 2 requests or one class only."""
    y = (np.asarray(labels).ravel() > 0.5).astype(np.float64)
    r = np.asarray(ref, dtype=np.float64).reshape(len(y), -1)[:, 0]
    g = np.asarray(got, dtype=np.float64).reshape(len(y), -1)[:, 0]
    if len(groups) < 2 or y.min() == y.max():
        return None
    k = min(len(groups), MAX_BLOCKS)
    block = np.empty(len(y), dtype=np.int64)
    for i, idx in enumerate(groups):
        block[idx] = i * k // len(groups)
    n_pos = np.bincount(block, weights=y, minlength=k)
    n_neg = np.bincount(block, weights=1 - y, minlength=k)
    m_ref, m_got = _pair_matrix(y, r, block, k), _pair_matrix(y, g, block, k)
    c = np.random.default_rng(seed).multinomial(k, np.full(k, 1 / k), size=n_boot).astype(np.float64)
    c = np.vstack([np.ones(k), c])  # row 0: the rows as they are (the point estimate)
    den = (c @ n_pos) * (c @ n_neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = ((c @ (m_got - m_ref)) * c).sum(axis=1) / den
    boot = diff[1:][np.isfinite(diff[1:])]
    if boot.size < 2 or not np.isfinite(diff[0]):
        return None
    point, se = float(diff[0]), float(np.std(boot, ddof=1))
    return {
        "delta_auc": point,
        "se": se,
        "ci_low": point - Z * se,
        "ci_high": point + Z * se,
        "level": 0.95,
        "method": f"paired bootstrap over {len(groups)} requests in {k} blocks ({boot.size} resamples)",
    }


def predictive_se(se: float, n_rows: int, n_heldout: int | None) -> float:
    """The se of a held-out ΔAUC as predicted from calibration: both estimates' noise
    (se scales as 1/sqrt(rows)); without held-out rows, the calibration se alone."""
    if not n_heldout:
        return se
    return se * math.sqrt(1.0 + n_rows / n_heldout)


def judge_auc(metrics: dict[str, Any], limit: float) -> tuple[bool, str, str]:
    """(ok, mode, readable) of the |ΔAUC| budget, for one output's metrics.

    mode: "resolved" (the interval decides), "unresolved" (the logit criterion decides) or
    "point" (no interval: the point estimate decides, as before). Reads ``delta_auc``,
    ``delta_auc_ci`` ({se, ...}), optional ``delta_auc_margin_se`` (the selection's
    predictive se) and ``logit_rel_rms``."""
    d = metrics.get("delta_auc")
    ci = metrics.get("delta_auc_ci")
    if d is None or not ci:
        ok = abs(d) <= limit if d is not None else True
        return ok, "point", f"abs_delta_auc = {abs(d or 0):.4g} (budget ≤ {limit:g})"
    se = metrics.get("delta_auc_margin_se") or ci["se"]
    shown = f"ΔAUC {d:+.2e} [{d - Z * se:+.2e}, {d + Z * se:+.2e}]"
    if abs(d) + Z * se <= limit:
        return True, "resolved", f"{shown} inside ±{limit:g}"
    if abs(d) - Z * se > limit:
        return False, "resolved", f"{shown} outside ±{limit:g} (budget ≤ {limit:g})"
    tol = logit_tolerance(limit)
    rel = metrics.get("logit_rel_rms")
    ok = rel is not None and rel <= tol
    return ok, "unresolved", (
        f"{shown} cannot resolve ±{limit:g}: logit error / score spread = "
        f"{(rel if rel is not None else float('nan')):.3g} (≤ {tol:.3g})"
    )
