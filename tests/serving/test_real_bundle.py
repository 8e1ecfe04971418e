"""End to end with the real exporter: capture, UG split, parity, then KServe v2 over HTTP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.http as triton

import runtime
from runtime.serving import ServerThread, build_app
from tests.conftest import make_toy_model
from tests.serving.http_utils import triton_scores


@pytest.fixture(scope="module")
def exported_split_bundle(tmp_path_factory, toy_checkpoint):
    from exporter import ExportOptions, export_bundle, load_student
    from exporter.steps.parity.check import check_bundle

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("real_split") / "toy"
    loaded = load_student(toy_checkpoint, trust=("tests",))
    export_bundle(loaded, out, ExportOptions(max_candidates=256))
    assert check_bundle(out, loaded.eager(), n_rows=100, progress=False, localise=False).passed
    return out


def _request(seed: int, n: int) -> tuple[dict, dict]:
    r = np.random.default_rng(seed)
    user = {"user_ids": r.integers(0, 50, (1, 2)), "user_dense": r.standard_normal((1, 3)).astype(np.float32)}
    cands = {"item_ids": r.integers(0, 40, (n, 2)), "item_dense": r.standard_normal((n, 1)).astype(np.float32)}
    return user, cands


def test_served_scores_match_eager_and_runtime(exported_split_bundle):
    scorer = runtime.load(exported_split_bundle, "onnxruntime")
    assert scorer.split, "the toy model has a user tower: the exporter must split it"
    eager = make_toy_model()
    with ServerThread(build_app([exported_split_bundle])) as srv:
        client = triton.InferenceServerClient(f"127.0.0.1:{srv.port}")
        for seed, n in [(1, 1), (2, 50), (3, 200), (1, 7)]:  # seed 1 again: a cache hit
            user, cands = _request(seed, n)
            got = triton_scores(client, "toy", user, cands, binary=seed % 2 == 0)
            np.testing.assert_array_equal(got, scorer.score(user, cands)["ctr"])
            with torch.no_grad():
                rows = {k: torch.from_numpy(np.repeat(v, n, 0)) for k, v in user.items()}
                want = eager(**rows, **{k: torch.from_numpy(v) for k, v in cands.items()}).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        stats = srv.app.state.repo.get("toy").cache.stats()
        assert (stats.hits, stats.misses) == (1, 3)
