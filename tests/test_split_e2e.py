"""End to end: students and an external CTR library through export -> split -> ONNX Runtime.

Split parity is checked through real onnxruntime sessions (the runtime's Scorer on
the exported bundle, or user/group sessions directly) against the eager PyTorch model
on user rows repeated per candidate, for a single request, N = 1, and several users
with unequal candidate counts in one call.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import runtime
from exporter.load import LoadedModel
from exporter.pipeline import ExportOptions, export_bundle
from exporter.steps.capture import to_torch_inputs
from exporter.steps.split import split_to_onnx
from runtime.sample import sample_rows
from runtime.spec import FeatureSpec

TOL = 1e-5


def _eager(model, spec, full) -> np.ndarray:
    with torch.no_grad():
        return model(**to_torch_inputs(spec, full)).reshape(-1).numpy()


def _requests(spec: FeatureSpec, counts: list[int], seed: int):
    users = sample_rows(spec, len(counts), seed)
    cands = sample_rows(spec, sum(counts), seed + 1)
    out, start = [], 0
    for i, n in enumerate(counts):
        user = {s.name: users[s.name][i] for s in spec.user_inputs}
        items = {s.name: cands[s.name][start : start + n] for s in spec.group_inputs}
        out.append((user, items))
        start += n
    return out


def _full_rows(spec, requests):
    rows = {s.name: [] for s in spec.inputs}
    for user, items in requests:
        n = len(next(iter(items.values())))
        for s in spec.inputs:
            rows[s.name].append(
                np.repeat(user[s.name][None], n, 0) if s.side == "user" else items[s.name]
            )
    return {k: np.concatenate(v) for k, v in rows.items()}


def _student(kind: str):
    from students.zoo import build_student

    torch.manual_seed(0)
    model = build_student(kind, "tiny").eval()
    return model, FeatureSpec.from_dict(model.feature_spec())


@pytest.fixture(scope="module")
def rankmixer_bundle(tmp_path_factory):
    """The tiny RankMixer through the whole export pipeline (capture, full, split, write)."""
    model, spec = _student("rankmixer")
    out = tmp_path_factory.mktemp("rankmixer") / "bundle"
    export_bundle(LoadedModel(spec=spec, module=model), out, ExportOptions(parity=False))
    return model, spec, out


def test_rankmixer_bundle_scores_split_like_eager_through_the_scorer(rankmixer_bundle):
    model, spec, out = rankmixer_bundle
    scorer = runtime.load(out, backend="onnxruntime", allow_unverified=True)
    assert scorer.split and set(scorer.manifest.stages) >= {"full", "user", "group"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split"]["user_index"] == "user_index"
    flops = manifest["flops"]
    assert flops["full_per_row"] == flops["user_per_row"] + flops["group_per_row"] > 0
    for counts in ([7], [1], [3, 1, 6, 2]):
        reqs = _requests(spec, counts, seed=len(counts))
        got = np.concatenate([r[spec.outputs[0]] for r in scorer.score_many(reqs)])
        ref = _eager(model, spec, _full_rows(spec, reqs))
        assert np.abs(got - ref).max() <= TOL, counts


def test_rankmixer_split_hoists_encoder_target_kv_and_user_tokens(rankmixer_bundle):
    _model, _spec, out = rankmixer_bundle
    split = json.loads((out / "manifest.json").read_text())["split"]
    hoisted = split["report"]["hoisted_modules"]
    assert any(m.startswith("seq_encoder.blocks") for m in hoisted)
    assert {"target.k", "target.v"} <= set(hoisted)
    layers = {m.split(".")[1] for m in hoisted if m.startswith("layers.")}
    assert layers and layers == {str(i) for i in range(len(layers))}
    assert split["report"]["blocked"] == []
    sources = [b["source"] for b in split["boundary"]]
    assert "target" in sources  # the target attention's keys/values cross the cut
    assert sum(s.startswith("layers.") for s in sources) >= len(layers)  # user tokens per layer
    assert all(b["shape"][0] == "M" for b in split["boundary"])


def test_rankmixer_group_token_mixing_runs_per_part_and_scores_like_eager(rankmixer_bundle):
    """The group graph's token mixing (Concat of gathered user tokens and candidate tokens,
    then Reshape / Slice / Transpose) runs per part, the user part before its Gather
    (graph_passes.onnx.hoist_gathered); a call merging several users still scores as eager."""
    import onnx

    model, spec, out = rankmixer_bundle
    group = onnx.load(str(out / "group.onnx"), load_external_data=False)
    hoisted = [
        n for n in group.graph.node
        if any(p.key == "ugsep.pass" and p.value == "HoistGatheredConcatPass" for p in n.metadata_props)
    ]
    gathers = [n for n in hoisted if n.op_type == "Gather"]
    assert gathers and any(n.op_type == "Transpose" for n in hoisted)
    producers = {o: n.op_type for n in group.graph.node for o in n.output}
    assert all(producers.get(g.input[0]) in ("Transpose", "Slice", "Reshape") for g in gathers)
    scorer = runtime.load(out, backend="onnxruntime", allow_unverified=True)
    reqs = _requests(spec, [5, 2, 4], seed=11)
    assert not scorer.request_scoped  # fp32: one group call with user_index over 3 users
    got = np.concatenate([r[spec.outputs[0]] for r in scorer.score_many(reqs)])
    assert np.abs(got - _eager(model, spec, _full_rows(spec, reqs))).max() <= TOL


@pytest.mark.parametrize("kind", ["dcn", "twotower"])
def test_other_students_split_matches_eager_through_ort(kind, tmp_path):
    from exporter.steps.capture import capture

    model, spec = _student(kind)
    art = split_to_onnx(capture(model, spec), spec, tmp_path)
    assert art.is_split, art.report
    user, group = (_session(art.paths[k]) for k in ("user", "group"))
    for counts in ([1], [3, 1, 6, 2]):
        reqs = _requests(spec, counts, seed=len(counts) + 10)
        got = _run_sessions(spec, user, group, reqs)
        ref = _eager(model, spec, _full_rows(spec, reqs))
        assert np.abs(got - ref).max() <= TOL, (kind, counts)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_sessions(spec, user, group, reqs) -> np.ndarray:
    """One user call for all M users, one group call for all candidates (as the Scorer does)."""
    names = [i.name for i in user.get_inputs()]
    users = {k: np.stack([u[k] for u, _ in reqs]) for k in names}
    counts = [len(next(iter(c.values()))) for _, c in reqs]
    boundary = dict(zip([o.name for o in user.get_outputs()], user.run(None, users), strict=True))
    cands = {s.name: np.concatenate([c[s.name] for _, c in reqs]) for s in spec.group_inputs}
    index = np.repeat(np.arange(len(reqs)), counts).astype(np.int64)
    feeds = {**cands, **boundary, "user_index": index}
    return group.run(None, {i.name: feeds[i.name] for i in group.get_inputs()})[0].reshape(-1)


# -- an external CTR library (deepctr-torch, from PyPI) through the columns spec ----------
def _deepfm():
    pytest.importorskip("requests")
    inputs = pytest.importorskip("deepctr_torch.inputs")
    models = pytest.importorskip("deepctr_torch.models")
    fc = [
        inputs.SparseFeat("user_id", 50, embedding_dim=4),
        inputs.SparseFeat("user_age", 8, embedding_dim=4),
        inputs.DenseFeat("user_score", 1),
        inputs.SparseFeat("item_id", 60, embedding_dim=4),
        inputs.DenseFeat("item_price", 1),
    ]
    torch.manual_seed(0)
    return models.DeepFM(fc, fc, task="binary", device="cpu", dnn_hidden_units=(16, 8)).eval()


DEEPFM_SPEC = {
    "name": "deepfm",
    "outputs": ["ctr"],
    "inputs": [
        {
            "name": "X",
            "side": "mixed",
            "dtype": "float32",
            "shape": [5],
            "columns": {"user": [[0, 3]], "group": [[3, 5]]},
        }
    ],
}


def _deepfm_rows(n: int, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    cols = [
        r.integers(0, 50, n),
        r.integers(0, 8, n),
        r.standard_normal(n),
        r.integers(0, 60, n),
        r.standard_normal(n),
    ]
    return np.stack(cols, 1).astype(np.float32)


def test_deepctr_deepfm_splits_through_columns_spec_with_ort_parity(tmp_path):
    model = _deepfm()
    spec = FeatureSpec.from_dict(DEEPFM_SPEC)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    x = torch.from_numpy(_deepfm_rows(4, 0))
    ep = torch.export.export(model, (), {"X": x}, dynamic_shapes={"X": {0: batch}}, strict=False)
    art = split_to_onnx(ep, spec, tmp_path, rows={"X": _deepfm_rows(8, 1)})
    assert art.is_split, art.report
    assert "embedding_dict.user_id" in art.report["hoisted_modules"]
    assert not any("item" in m for m in art.report["hoisted_modules"])
    user = ort.InferenceSession(str(art.paths["user"]), providers=["CPUExecutionProvider"])
    group = ort.InferenceSession(str(art.paths["group"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in user.get_inputs()] == ["X"]
    counts = [3, 1, 5]
    users = _deepfm_rows(len(counts), 2)
    cands = _deepfm_rows(sum(counts), 3)
    index = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    cands[:, :3] = users[index, :3]  # each candidate row carries its user's columns
    boundary = dict(
        zip([o.name for o in user.get_outputs()], user.run(None, {"X": users}), strict=True)
    )
    feeds = {"X": cands, **boundary, "user_index": index}
    got = group.run(None, {i.name: feeds[i.name] for i in group.get_inputs()})[0].reshape(-1)
    with torch.no_grad():
        ref = model(torch.from_numpy(cands)).reshape(-1).numpy()
    assert np.abs(got - ref).max() <= TOL


# -- small inline models through the pipeline ------------------------------------------
TWO_INPUTS = {
    "name": "two",
    "outputs": ["ctr"],
    "inputs": [
        {"name": "u", "side": "user", "dtype": "float32", "shape": [4]},
        {"name": "g", "side": "group", "dtype": "float32", "shape": [4]},
    ],
}


class _CentredUser(torch.nn.Module):
    """All user work is centred over the batch: nothing can be hoisted."""

    def forward(self, u, g):
        return torch.sigmoid(((u - u.mean(0)) * g).sum(-1))


class _RawAndTower(torch.nn.Module):
    """A raw user input and a user tower both cross the cut."""

    def __init__(self):
        super().__init__()
        self.tower = torch.nn.Linear(4, 4)

    def forward(self, u, g):
        return torch.sigmoid((self.tower(u) * g).sum(-1) + (u * g).sum(-1))


def test_unsplittable_model_still_exports_full_and_reports_the_blocking_op(tmp_path):
    spec = FeatureSpec.from_dict(TWO_INPUTS)
    out = tmp_path / "bundle"
    export_bundle(LoadedModel(spec=spec, module=_CentredUser()), out, ExportOptions(parity=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split"] is None and set(manifest["stages"]) == {"full"}
    assert not (out / "user.onnx").exists()
    report = json.loads((out / "split_report.json").read_text())["report"]
    assert report["split"] is False and "mean" in report["reason"]
    assert "u.mean(0)" in report["blocked"][0]["source"]
    scorer = runtime.load(out, backend="onnxruntime", allow_unverified=True)
    reqs = _requests(spec, [3], seed=0)
    got = scorer.score_many(reqs)[0]["ctr"]
    assert np.abs(got - _eager(_CentredUser(), spec, _full_rows(spec, reqs))).max() <= TOL


def test_raw_user_input_crossing_the_cut_through_ort(tmp_path):
    from exporter.steps.capture import capture

    torch.manual_seed(0)
    model, spec = _RawAndTower().eval(), FeatureSpec.from_dict(TWO_INPUTS)
    art = split_to_onnx(capture(model, spec), spec, tmp_path)
    assert art.is_split and {b["source"] for b in art.boundary} == {"input", "tower"}
    user, group = _session(art.paths["user"]), _session(art.paths["group"])
    reqs = _requests(spec, [2, 1, 4], seed=5)
    got = _run_sessions(spec, user, group, reqs)
    assert np.abs(got - _eager(model, spec, _full_rows(spec, reqs))).max() <= TOL
