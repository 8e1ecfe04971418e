"""Triton fixtures: real split bundles, the Triton Python env, real tritonservers on loopback.

The split bundle is the serving tests' hand-made user/group ONNX pair (real
torch.onnx exports of a two-part torch model; see tests/serving/split_bundle.py), so
scores can be checked against the eager torch model as well as the runtime scorer.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.serving.split_bundle import make_parts, write_split_bundle

MAX_CANDIDATES = 64


@pytest.fixture(scope="session")
def tri_parts():
    return make_parts(seed=3)


@pytest.fixture(scope="session")
def tri_bundle(tmp_path_factory, tri_parts):
    """A verified, parity-passed split bundle (user.onnx, group.onnx, full.onnx)."""
    user, group = tri_parts
    return write_split_bundle(
        tmp_path_factory.mktemp("triton_bundle") / "toysplit",
        user,
        group,
        max_candidates=MAX_CANDIDATES,
    )


@pytest.fixture(scope="session")
def tri_scorer(tri_bundle):
    import runtime

    return runtime.load(tri_bundle, "onnxruntime")


@pytest.fixture(scope="session")
def triton_env():
    """The Triton Python env, created when missing (never skipped: `make test` needs it)."""
    from runtime.triton.env import ensure_triton_env

    return ensure_triton_env()


def ranking(seed: int, n: int) -> tuple[dict, dict]:
    """One ranking: user features [1, ...] and n candidates [n, ...] for the toysplit spec."""
    ru, rc = np.random.default_rng(50_000 + seed), np.random.default_rng(seed)
    user = {
        "user_ids": ru.integers(0, 50, size=(1, 3)).astype(np.int64),
        "user_dense": ru.standard_normal((1, 4)).astype(np.float32),
    }
    cands = {
        "item_ids": rc.integers(0, 40, size=(n, 2)).astype(np.int64),
        "item_dense": rc.standard_normal((n, 2)).astype(np.float32),
    }
    return user, cands


def triton_inputs(rankings: list[tuple[dict, dict]], binary: bool) -> list:
    """The Triton wire format: user inputs [B, ...], candidate inputs [B, N, ...]."""
    import tritonclient.http as th

    user = {k: np.concatenate([u[k] for u, _ in rankings]) for k in rankings[0][0]}
    cands = {k: np.stack([c[k] for _, c in rankings]) for k in rankings[0][1]}
    out = []
    for k, v in {**user, **cands}.items():
        i = th.InferInput(k, list(v.shape), th.np_to_triton_dtype(v.dtype))
        i.set_data_from_numpy(v, binary_data=binary)
        out.append(i)
    return out


def triton_scores(
    client, model: str, rankings: list[tuple[dict, dict]], binary: bool
) -> np.ndarray:
    import tritonclient.http as th

    outputs = [th.InferRequestedOutput("ctr", binary_data=binary)]
    return client.infer(model, triton_inputs(rankings, binary), outputs=outputs).as_numpy("ctr")


@pytest.fixture(scope="session")
def toy_split_bundle(tmp_path_factory, toy_checkpoint):
    """A bundle from the real exporter (capture, UG split, ONNX) with a real parity check."""
    import torch

    from exporter import ExportOptions, export_bundle, load_student
    from exporter.parity.check import check_bundle

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("toy_split") / "toy"
    loaded = load_student(toy_checkpoint)
    export_bundle(loaded, out, ExportOptions(max_candidates=MAX_CANDIDATES))
    report = check_bundle(out, loaded.eager(), n_rows=200, progress=False, localise=False)
    assert report.passed, "the toy export failed its parity check"
    return out


def toy_ranking(seed: int, n: int) -> tuple[dict, dict]:
    """One ranking for tests/conftest.py's TOY_SPEC (user_ids/user_dense, item_ids/item_dense)."""
    r = np.random.default_rng(seed)
    user = {
        "user_ids": r.integers(0, 50, size=(1, 2)).astype(np.int64),
        "user_dense": r.standard_normal((1, 3)).astype(np.float32),
    }
    cands = {
        "item_ids": r.integers(0, 40, size=(n, 2)).astype(np.int64),
        "item_dense": r.standard_normal((n, 1)).astype(np.float32),
    }
    return user, cands


def toy_eager(user: dict, cands: dict) -> np.ndarray:
    """Scores of the eager toy model (the checkpoint's weights), user row repeated per candidate."""
    import torch

    from tests.conftest import make_toy_model

    n = cands["item_ids"].shape[0]
    feeds = {k: torch.from_numpy(np.repeat(v, n, axis=0)) for k, v in user.items()}
    feeds.update({k: torch.from_numpy(v) for k, v in cands.items()})
    with torch.no_grad():
        return make_toy_model()(**feeds).numpy()
