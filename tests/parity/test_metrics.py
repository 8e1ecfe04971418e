"""Parity metrics against brute-force definitions and hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.evaluate import metrics as M


def brute_auc(labels, scores) -> float:
    """P(score of a positive > score of a negative), ties counting one half: all pairs."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y > 0.5]
    neg = [s for y, s in zip(labels, scores, strict=True) if y <= 0.5]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def brute_tau_b(a, b) -> float:
    """Kendall tau-b from concordant/discordant pair counts and per-side ties."""
    conc = disc = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            conc += 1
        else:
            disc += 1
    n0 = conc + disc
    return (conc - disc) / math.sqrt((n0 + ties_a) * (n0 + ties_b))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 6)),  # few score levels: many ties
        min_size=2,
        max_size=40,
    ).filter(lambda r: 0 < sum(y for y, _ in r) < len(r))
)
def test_auc_matches_pairwise_definition_with_ties(rows):
    y = np.array([r[0] for r in rows], dtype=np.float32)
    s = np.array([r[1] for r in rows], dtype=np.float64) / 7.0
    assert M.auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


def test_auc_hand_values():
    assert M.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert M.auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert M.auc([0, 1], [0.5, 0.5]) == 0.5
    assert M.auc([0, 1, 1], [0.1, 0.1, 0.9]) == 0.75
    assert math.isnan(M.auc([1, 1], [0.1, 0.2]))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=3, max_size=25).filter(
        lambda r: len({a for a, _ in r}) > 1 and len({b for _, b in r}) > 1
    )
)
def test_kendall_tau_matches_pair_counting(pairs):
    a = np.array([p[0] for p in pairs], dtype=np.float64)
    b = np.array([p[1] for p in pairs], dtype=np.float64)
    assert M.kendall_tau(a, b) == pytest.approx(brute_tau_b(a, b), abs=1e-12)


def test_kendall_tau_hand_values():
    assert M.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert M.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # one swapped adjacent pair out of 6 pairs: (5 - 1) / 6
    assert M.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


def test_topk_overlap():
    ref = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], dtype=float)
    got = ref.copy()
    assert M.topk_overlap(ref, got, 3) == 1.0
    got[[2, 3]] = got[[3, 2]]  # swap inside the top 3 / boundary: {0,1,3} vs {0,1,2}
    assert M.topk_overlap(ref, got, 3) == pytest.approx(2 / 3)
    assert M.topk_overlap(ref, -ref, 5) == 0.0


def test_log_loss_hand_value_and_logits():
    y = np.array([1.0, 0.0])
    p = np.array([0.8, 0.4])
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert M.log_loss(y, p) == pytest.approx(expected)
    logits = np.log(p / (1 - p))  # outside [0, 1]: read as logits
    assert M.log_loss(y, logits) == pytest.approx(expected)


def test_element_errors_hand_values():
    ref = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    got = np.array([1.0, -2.5, 0.5], dtype=np.float32)
    e = M.element_errors(ref, got)
    assert e["max_abs"] == pytest.approx(0.5)
    assert e["mean_abs"] == pytest.approx(0.5 / 3)
    assert e["max_rel"] == pytest.approx(0.25)
    cos = (1 + 5 + 0.25) / (math.sqrt(1 + 4 + 0.25) * math.sqrt(1 + 6.25 + 0.25))
    assert e["cosine"] == pytest.approx(cos)
    assert e["nonfinite"] == 0
    assert M.element_errors(ref, np.array([1, np.nan, 0.5]))["nonfinite"] == 1


def test_request_groups_keep_first_appearance_order():
    groups = M.request_groups(np.array([7, 7, 3, 3, 3, 9]))
    assert [g.tolist() for g in groups] == [[0, 1], [2, 3, 4], [5]]


def test_ranking_metrics_only_count_requests_longer_than_k():
    ref = np.arange(30, dtype=float)
    groups = [np.arange(0, 12), np.arange(12, 30)]  # 12 and 18 candidates
    out = M.ranking_metrics(ref, ref, groups, ks=(10, 15))
    assert out["top10_overlap"]["n"] == 2 and out["top10_overlap"]["mean"] == 1.0
    assert out["top15_overlap"]["n"] == 1
    assert out["kendall_tau"]["p5"] == 1.0
    assert M.ranking_metrics(ref, ref, groups, ks=(50,))["top50_overlap"] is None


def test_distribution_percentiles():
    d = M.distribution([0.0, 1.0, 2.0, 3.0, 4.0])
    assert d == {"n": 5, "mean": 2.0, "min": 0.0, "p5": 0.2, "p50": 2.0, "p95": 3.8}
