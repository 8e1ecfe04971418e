"""ΔAUC uncertainty and the verdict that knows it (exporter.evaluate.auc_noise)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exporter.evaluate.auc_noise import (
    delta_auc_interval,
    judge_auc,
    logit_rel_rms,
    logit_tolerance,
    predictive_se,
)
from exporter.evaluate.budgets import evaluate
from exporter.evaluate.metrics import auc, request_groups


def _scores(n_req: int = 120, per: int = 50, noise: float = 0.02, seed: int = 0):
    rng = np.random.default_rng(seed)
    rid = np.repeat(np.arange(n_req), per)
    user = rng.normal(size=n_req)[rid]  # rows of one request share a user effect
    logit = 0.8 * user + rng.normal(size=rid.size)
    y = (rng.random(rid.size) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    ref = logit + 0.3 * rng.normal(size=rid.size)  # the model: an imperfect ranker
    got = ref + noise * rng.normal(size=rid.size)  # the quantized model: a little error
    return y, ref, got, rid


def test_interval_point_is_the_auc_difference_and_se_matches_a_plain_request_bootstrap():
    y, ref, got, rid = _scores()
    ref, got = np.round(ref, 2), np.round(got, 2)  # ties across the two classes, too
    groups = request_groups(rid)
    ci = delta_auc_interval(y, ref, got, groups)
    assert ci["delta_auc"] == pytest.approx(auc(y, got) - auc(y, ref), abs=1e-12)
    assert ci["ci_low"] < ci["delta_auc"] < ci["ci_high"]
    rng = np.random.default_rng(1)  # an independent bootstrap: whole requests, plain AUCs
    deltas = []
    for _ in range(300):
        idx = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        deltas.append(auc(y[idx], got[idx]) - auc(y[idx], ref[idx]))
    assert ci["se"] == pytest.approx(np.std(deltas, ddof=1), rel=0.25)


def test_interval_shrinks_with_rows_and_grows_with_error():
    small = delta_auc_interval(*_scores(n_req=20)[:3], request_groups(_scores(n_req=20)[3]))
    large = delta_auc_interval(*_scores(n_req=320)[:3], request_groups(_scores(n_req=320)[3]))
    noisy = delta_auc_interval(*_scores(n_req=320, noise=0.2)[:3], request_groups(_scores(n_req=320)[3]))
    assert large["se"] < small["se"] and noisy["se"] > large["se"]


def test_logit_tolerance_keeps_binormal_auc_loss_within_half_the_budget():
    """AUC = Phi(d / sqrt(2)) for unit-variance binormal scores; independent errors of
    relative size eps give Phi(d / sqrt(2 (1 + eps^2))). Checked over separations d."""
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    for budget in (1e-4, 5e-4):
        eps = logit_tolerance(budget)
        worst = max(
            phi(d / math.sqrt(2)) - phi(d / math.sqrt(2 * (1 + eps**2)))
            for d in np.linspace(0.05, 6, 400)
        )
        assert budget / 2 * 0.9 < worst <= budget / 2 * 1.01
    assert logit_rel_rms(np.array([0.2, 0.5, 0.8]), np.array([0.2, 0.5, 0.8])) == 0.0


def _m(d, se, rel=None, margin=None):
    m = {"delta_auc": d, "abs_delta_auc": abs(d), "delta_auc_ci": {"se": se}}
    if rel is not None:
        m["logit_rel_rms"] = rel
    if margin is not None:
        m["delta_auc_margin_se"] = margin
    return m


def test_judge_three_ways():
    assert judge_auc(_m(2e-5, 3e-5), 1e-4)[:2] == (True, "resolved")  # 2e-5 + 5.9e-5 <= 1e-4
    assert judge_auc(_m(-3e-4, 5e-5), 1e-4)[:2] == (False, "resolved")  # 3e-4 - 9.8e-5 > 1e-4
    assert judge_auc(_m(-1.3e-4, 8e-5, rel=0.009), 1e-4)[:2] == (True, "unresolved")
    assert judge_auc(_m(-1.3e-4, 8e-5, rel=0.05), 1e-4)[:2] == (False, "unresolved")
    # the selection's predictive se (its own noise and the held-out rows') widens the interval
    assert judge_auc(_m(2e-5, 3e-5, rel=0.05, margin=5e-5), 1e-4)[:2] == (False, "unresolved")
    assert predictive_se(3e-5, 2000, 6000) == pytest.approx(3e-5 * math.sqrt(1 + 1 / 3))


def test_point_estimate_verdicts_that_noise_decided_are_no_longer_given():
    """Before: |ΔAUC| alone decided. A ΔAUC inside the budget by luck (interval far wider,
    large logit error) passed; one outside by noise (tiny logit error) failed."""
    limits = {"abs_delta_auc": 1e-4}
    lucky = _m(5e-5, 2e-4, rel=0.08)
    assert evaluate(lucky, limits)[0], "a lucky point estimate must not pass"
    unlucky = _m(-1.14e-4, 8e-5, rel=0.006)  # the 8,000-row held-out case
    assert evaluate(unlucky, limits)[0] == []
    assert evaluate({"delta_auc": 2e-4, "abs_delta_auc": 2e-4}, limits)[0]  # no interval: point
