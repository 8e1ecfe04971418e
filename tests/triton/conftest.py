"""Triton fixtures: real bundles, the Triton Python env, real tritonservers on loopback.

- ``tri_bundle``: the serving tests' hand-made split bundle (real torch.onnx exports of a
  two-part torch model; tests/serving/split_bundle.py), fast, with eager halves to compare;
- ``student_bundle``: the tiny RankMixer student through the real exporter and parity check;
- ``toy_bundle`` (tests/conftest.py): an unsplit export (full.onnx only).
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
    client, model: str, rankings: list[tuple[dict, dict]], binary: bool, output: str = "ctr"
) -> np.ndarray:
    """Scores [B, N] for B rankings in one request (output ``output``)."""
    import tritonclient.http as th

    outputs = [th.InferRequestedOutput(output, binary_data=binary)]
    return client.infer(model, triton_inputs(rankings, binary), outputs=outputs).as_numpy(output)


@pytest.fixture(scope="session")
def student_bundle(tmp_path_factory):
    """The tiny RankMixer student through the real exporter (capture, UG split, ONNX) and a
    real parity check: several boundary tensors (encoder output, target-attention K/V,
    user tokens), 3-D and 4-D. Returns (eager model, spec, bundle dir)."""
    import torch

    from exporter.load import LoadedModel
    from exporter.pipeline import ExportOptions, export_bundle
    from exporter.steps.parity.check import check_bundle
    from runtime.spec import FeatureSpec
    from students.zoo import build_student

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_student("rankmixer", "tiny").eval()
    spec = FeatureSpec.from_dict(model.feature_spec())
    out = tmp_path_factory.mktemp("student") / "rankmixer"
    export_bundle(
        LoadedModel(spec=spec, module=model), out, ExportOptions(max_candidates=MAX_CANDIDATES)
    )
    report = check_bundle(out, model, n_rows=200, progress=False, localise=False)
    assert report.passed, "the RankMixer export failed its parity check"
    return model, spec, out


def student_ranking(spec, seed: int, n: int) -> tuple[dict, dict]:
    """One ranking drawn from the spec: user features [1, ...], n candidates [n, ...]."""
    from runtime.sample import sample_rows

    user = sample_rows(spec, 1, seed)
    cands = sample_rows(spec, n, seed + 1)
    return (
        {s.name: user[s.name] for s in spec.user_inputs},
        {s.name: cands[s.name] for s in spec.group_inputs},
    )


def student_eager(model, spec, user: dict, cands: dict) -> np.ndarray:
    """The eager model on the user row repeated per candidate (what it was trained on)."""
    import torch

    from exporter.steps.capture import to_torch_inputs

    n = next(iter(cands.values())).shape[0]
    rows = {k: np.repeat(v, n, axis=0) for k, v in user.items()}
    rows.update(cands)
    with torch.no_grad():
        return model(**to_torch_inputs(spec, rows)).reshape(-1).numpy()


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
