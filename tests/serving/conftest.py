"""Serving fixtures: real split bundles (hand-made user/group ONNX pair) and request data."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serving.split_bundle import make_parts, write_split_bundle


@pytest.fixture(scope="session")
def split_parts():
    """The eager torch halves of the split test model (the reference for scores)."""
    return make_parts(seed=0)


@pytest.fixture(scope="session")
def split_bundle(tmp_path_factory, split_parts):
    """A verified split bundle (user.onnx, group.onnx, full.onnx) of the test model."""
    user, group = split_parts
    return write_split_bundle(tmp_path_factory.mktemp("serving") / "toysplit", user, group, max_candidates=256)


@pytest.fixture(scope="session")
def split_bundle_v2(tmp_path_factory, split_bundle):
    """The same model with every weight scaled by 1.25: a new version for reloads."""
    from tests.serving.split_bundle import perturbed_copy

    return perturbed_copy(split_bundle, tmp_path_factory.mktemp("serving_v2") / "toysplit")


@pytest.fixture(scope="session")
def scorer(split_bundle):
    import runtime

    return runtime.load(split_bundle, "onnxruntime")


def make_request(seed: int, n: int, user_seed: int | None = None) -> tuple[dict, dict]:
    """One request: user features [1, ...] (drawn from ``user_seed``) and ``n`` candidates."""
    ru = np.random.default_rng(10_000 + (seed if user_seed is None else user_seed))
    rc = np.random.default_rng(seed)
    user = {
        "user_ids": ru.integers(0, 50, size=(1, 3)).astype(np.int64),
        "user_dense": ru.standard_normal((1, 4)).astype(np.float32),
    }
    cands = {
        "item_ids": rc.integers(0, 40, size=(n, 2)).astype(np.int64),
        "item_dense": rc.standard_normal((n, 2)).astype(np.float32),
    }
    return user, cands


@pytest.fixture(scope="session")
def other_bundle(tmp_path_factory, split_bundle_v2):
    """The v2 weights served under the model name 'other'."""
    from tests.serving.split_bundle import renamed_copy

    return renamed_copy(split_bundle_v2, tmp_path_factory.mktemp("other") / "other", "other")
