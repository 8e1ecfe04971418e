"""The runtime scorer on a real bundle: correct scores, and a clear RequestError per bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from runtime.errors import ParityError, RequestError
from tests.conftest import make_toy_model


@pytest.fixture(scope="module")
def scorer(toy_bundle):
    return runtime.load(toy_bundle, allow_unverified=True)


def _request(n=5, seed=0):
    rng = np.random.default_rng(seed)
    user = {"user_ids": rng.integers(0, 50, (1, 2)), "user_dense": rng.standard_normal((1, 3)).astype(np.float32)}
    cands = {"item_ids": rng.integers(0, 40, (n, 2)), "item_dense": rng.standard_normal((n, 1)).astype(np.float32)}
    return user, cands


def _eager(user, cands):
    n = len(cands["item_ids"])
    with torch.no_grad():
        return make_toy_model()(
            torch.from_numpy(np.repeat(user["user_ids"], n, 0)),
            torch.from_numpy(np.repeat(user["user_dense"], n, 0)),
            torch.from_numpy(cands["item_ids"]),
            torch.from_numpy(cands["item_dense"]),
        ).numpy()


def test_scores_match_eager(scorer):
    user, cands = _request(7)
    out = scorer.score(user, cands)
    assert out["ctr"].shape == (7,)
    np.testing.assert_allclose(out["ctr"], _eager(user, cands), atol=1e-6)


def test_user_without_leading_dim_and_lists(scorer):
    user, cands = _request(3)
    a = scorer.score(user, cands)["ctr"]
    b = scorer.score({k: v[0].tolist() for k, v in user.items()}, {k: v.tolist() for k, v in cands.items()})["ctr"]
    np.testing.assert_array_equal(a, b)


def test_score_many_equals_individual_calls(scorer):
    reqs = [_request(n, seed=n) for n in (1, 4, 9)]
    many = scorer.score_many(reqs)
    for (u, c), got in zip(reqs, many, strict=True):
        np.testing.assert_allclose(got["ctr"], scorer.score(u, c)["ctr"], atol=1e-6)


BAD = {
    "unknown input": (lambda u, c: u.update(age=np.zeros((1, 1))), r"unknown user input\(s\) \['age'\]"),
    "missing user input": (lambda u, c: u.pop("user_dense"), r"missing user input\(s\) \['user_dense'\]"),
    "missing candidate input": (lambda u, c: c.pop("item_ids"), r"missing candidate input\(s\) \['item_ids'\]"),
    "wrong dtype": (lambda u, c: c.update(item_dense=c["item_dense"].astype(np.float64)),
                    "input 'item_dense' has dtype float64; the spec says float32"),
    "wrong user shape": (lambda u, c: u.update(user_ids=np.zeros((2, 2), np.int64)), "user input 'user_ids' has shape \\[2, 2\\]"),
    "wrong candidate shape": (lambda u, c: c.update(item_ids=np.zeros((5, 3), np.int64)), "candidate input 'item_ids' has shape \\[5, 3\\]"),
    "ragged candidates": (lambda u, c: c.update(item_dense=np.zeros((4, 1), np.float32)), "has 4 rows but other candidate inputs have 5"),
    "id above vocab": (lambda u, c: c["item_ids"].__setitem__((2, 1), 40), r"input 'item_ids' has id 40 outside its vocabulary \[0, 40\)"),
    "negative id": (lambda u, c: u["user_ids"].__setitem__((0, 0), -3), "input 'user_ids' has id -3 outside"),
    "nan": (lambda u, c: c["item_dense"].__setitem__((1, 0), np.nan), "input 'item_dense' contains NaN"),
    "inf": (lambda u, c: u["user_dense"].__setitem__((0, 1), np.inf), "input 'user_dense' contains NaN or infinite"),
    "empty": (lambda u, c: c.update(item_ids=np.zeros((0, 2), np.int64), item_dense=np.zeros((0, 1), np.float32)), r"no candidates \(N = 0\)"),
    "oversize": (lambda u, c: c.update(item_ids=np.zeros((65, 2), np.int64), item_dense=np.zeros((65, 1), np.float32)), "has 65 candidates; this bundle accepts at most 64"),
    "strings": (lambda u, c: c.update(item_ids=[["a", "b"]] * 5), "non-numeric"),
    "fractional ids": (lambda u, c: u.update(user_ids=[[1.5, 2.0]]), "non-integer values"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_a_clear_error(scorer, case):
    mutate, message = BAD[case]
    user, cands = _request(5)
    mutate(user, cands)
    with pytest.raises(RequestError, match=message):
        scorer.score(user, cands)
    # and the scorer still works afterwards
    u, c = _request(2)
    assert scorer.score(u, c)["ctr"].shape == (2,)


def test_validation_does_not_mutate_inputs(scorer):
    user, cands = _request(4)
    before = {k: v.copy() for k, v in {**user, **cands}.items()}
    scorer.score(user, cands)
    for k, v in {**user, **cands}.items():
        np.testing.assert_array_equal(v, before[k])


def test_export_records_parity_and_the_runtime_accepts_it(toy_bundle):
    """export_bundle runs the parity step last: the bundle it writes is served as is."""
    scorer = runtime.load(toy_bundle)
    assert scorer.manifest.parity.passed is True


def test_bundle_without_parity_is_refused_by_default(tmp_path, toy_checkpoint):
    from exporter import ExportOptions, export_bundle, load_student

    out = tmp_path / "unchecked"
    export_bundle(load_student(toy_checkpoint, trust=("tests",)), out, ExportOptions(split=False, parity=False))
    with pytest.raises(ParityError, match="has no parity record"):
        runtime.load(out)
    assert runtime.load(out, allow_unverified=True).score is not None
