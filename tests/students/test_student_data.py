"""The synthetic CTR generator and the numpy metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from students.data import DATA_CONFIGS, INPUT_NAMES, World, load_npz, make_dataset, rename, save_npz
from students.metrics import auc, bayes_auc, expected_bayes_auc, log_loss


@pytest.fixture(scope="module")
def tiny():
    return make_dataset("tiny", n_train=5000, n_requests=40, candidates=25, seed=3)


def test_same_seed_same_data_other_seed_other_data():
    _, a_train, a_held = make_dataset("tiny", n_train=2000, n_requests=10, candidates=5, seed=7)
    _, b_train, b_held = make_dataset("tiny", n_train=2000, n_requests=10, candidates=5, seed=7)
    _, c_train, _ = make_dataset("tiny", n_train=2000, n_requests=10, candidates=5, seed=8)
    for k in a_train:
        np.testing.assert_array_equal(a_train[k], b_train[k])
    for k in a_held:
        np.testing.assert_array_equal(a_held[k], b_held[k])
    assert not np.array_equal(a_train["item_ids"], c_train["item_ids"])
    assert not np.array_equal(a_train["label"], c_train["label"])


def test_layout_matches_the_config(tiny):
    _, train, held = tiny
    cfg = DATA_CONFIGS["tiny"]
    widths = {
        "user_ids": cfg.n_user_fields,
        "user_dense": cfg.n_user_dense,
        "user_seq": cfg.seq_len,
        "item_ids": cfg.n_item_fields,
        "item_dense": cfg.n_item_dense,
    }
    for rows, n in ((train, 5000), (held, 40 * 25)):
        for name in INPUT_NAMES:
            assert rows[name].shape == (n, widths[name]), name
            assert rows[name].dtype == (np.int64 if name.endswith(("ids", "seq")) else np.float32)
        for name in ("user_ids", "user_seq", "item_ids"):
            assert rows[name].min() >= 1 and rows[name].max() < cfg.vocab
        assert set(np.unique(rows["label"])) <= {0.0, 1.0}
        assert rows["label"].dtype == np.float32 and rows["prob"].dtype == np.float32
    assert held["request_id"].dtype == np.int64 and "request_id" not in train


def test_sequences_hold_item_ids(tiny):
    world, train, _ = tiny
    assert np.isin(train["user_seq"], world.item_ids[:, 0]).all()


def test_requests_group_one_user_and_many_candidates(tiny):
    _, _, held = tiny
    rid = held["request_id"]
    assert np.all(np.diff(rid) >= 0), "rows of a request are contiguous"
    assert np.array_equal(np.bincount(rid), np.full(40, 25))
    for r in range(40):
        rows = rid == r
        for name in ("user_ids", "user_dense", "user_seq"):
            block = held[name][rows]
            assert (block == block[0]).all(), f"request {r}: {name} varies within the request"
        assert len(np.unique(held["item_ids"][rows][:, 0])) > 1


def test_click_model_needs_user_item_crosses():
    """Remove the best additive fit (user effect + item effect): most variance must remain."""
    world = World(DATA_CONFIGS["tiny"], seed=0)
    u, i = np.meshgrid(np.arange(200), np.arange(150), indexing="ij")
    logit = world.logit(u.ravel(), i.ravel()).reshape(u.shape)
    centred = logit - logit.mean()
    residual = centred - centred.mean(1, keepdims=True) - centred.mean(0, keepdims=True)
    assert residual.var() > 0.5 * centred.var()


def test_labels_follow_the_true_probabilities(tiny):
    _, train, _ = tiny
    prob, label = train["prob"], train["label"]
    assert abs(label.mean() - prob.mean()) < 0.03
    hi = prob > np.quantile(prob, 0.8)
    lo = prob < np.quantile(prob, 0.2)
    assert label[hi].mean() > label[lo].mean() + 0.2


def test_npz_round_trip_and_rename(tmp_path, tiny):
    _, _, held = tiny
    renamed = rename(held, {"user_ids": "user.ids"})
    assert "user.ids" in renamed and "user_ids" not in renamed and "label" in renamed
    path = save_npz(tmp_path / "held.npz", renamed)
    back = load_npz(path)
    assert sorted(back) == sorted(renamed)
    for k in renamed:
        np.testing.assert_array_equal(back[k], renamed[k])


# --- metrics, against brute-force definitions ----------------------------------------------


def _pairwise_auc(label, score):
    pos = [s for s, y in zip(score, label, strict=True) if y == 1]
    neg = [s for s, y in zip(score, label, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    label = (rng.random(300) < 0.3).astype(np.float32)
    score = rng.integers(0, 12, 300).astype(np.float32)  # many ties
    assert auc(label, score) == pytest.approx(_pairwise_auc(label, score), abs=1e-12)
    assert auc(label, -score) == pytest.approx(1 - _pairwise_auc(label, score), abs=1e-12)
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.3])) == 1.0
    assert np.isnan(auc(np.ones(5), np.arange(5)))


def test_log_loss_matches_the_formula():
    label = np.array([1, 0, 1, 0], dtype=np.float32)
    prob = np.array([0.9, 0.2, 0.6, 0.5])
    expected = -np.mean([np.log(0.9), np.log(0.8), np.log(0.6), np.log(0.5)])
    assert log_loss(label, prob) == pytest.approx(expected, rel=1e-12)


def test_expected_bayes_auc_matches_pairs_and_sampling():
    rng = np.random.default_rng(1)
    prob = np.round(rng.random(60), 1)  # ties included
    num = den = 0.0
    for i, j in itertools.permutations(range(60), 2):
        w = prob[i] * (1 - prob[j])
        den += w
        num += w * (1.0 if prob[i] > prob[j] else 0.5 if prob[i] == prob[j] else 0.0)
    assert expected_bayes_auc(prob) == pytest.approx(num / den, abs=1e-12)
    _, _, held = make_dataset("tiny", n_train=10, n_requests=400, candidates=50, seed=0)
    draws = [
        bayes_auc(rng.random(held["prob"].size) < held["prob"], held["prob"]) for _ in range(20)
    ]
    assert expected_bayes_auc(held["prob"]) == pytest.approx(np.mean(draws), abs=0.005)


def test_true_probabilities_beat_noisy_ones(tiny):
    _, _, held = tiny
    noisy = held["prob"] + np.random.default_rng(0).normal(0, 0.2, held["prob"].shape)
    assert bayes_auc(held["label"], held["prob"]) > auc(held["label"], noisy)
    assert bayes_auc(held["label"], held["prob"]) > 0.7
