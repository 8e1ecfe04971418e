"""The export pipeline end to end on small real models: dynamic batch, dict arguments, CLI."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporter import ExportError, ExportOptions, LoadedModel, export_bundle, load_student
from exporter.steps.capture import to_torch_inputs
from runtime.manifest import Manifest
from runtime.sample import sample_rows
from runtime.spec import FeatureSpec


class DictArgs(torch.nn.Module):
    """forward(user: dict, item: dict) — addressed in the spec as user.ids, item.dense …"""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Embedding(30, 4)
        self.u = torch.nn.Linear(4 * 3 + 2, 6)
        self.i = torch.nn.Linear(4 + 1, 6)

    def forward(self, user, item):
        u = self.u(torch.cat([self.emb(user["ids"]).flatten(1), user["dense"]], 1))
        i = self.i(torch.cat([self.emb(item["ids"]).flatten(1), item["dense"]], 1))
        return torch.sigmoid((u * i).sum(-1))


DICT_SPEC = {
    "name": "dict_args",
    "inputs": [
        {"name": "user.ids", "side": "user", "dtype": "int64", "shape": [3], "vocab": 30},
        {"name": "user.dense", "side": "user", "dtype": "float32", "shape": [2]},
        {"name": "item.ids", "side": "group", "dtype": "int64", "shape": [1], "vocab": 30},
        {"name": "item.dense", "side": "group", "dtype": "float32", "shape": [1]},
    ],
    "outputs": ["ctr"],
}


def _eager(model, spec, rows):
    with torch.no_grad():
        return model(**to_torch_inputs(spec, rows)).numpy()


@pytest.mark.parametrize("batch", [1, 2, 7, 1000])
def test_full_onnx_matches_eager_at_any_batch(toy_bundle, toy_checkpoint, batch):
    loaded = load_student(toy_checkpoint, trust=("tests",))
    rows = sample_rows(loaded.spec, batch, seed=batch)
    sess = ort.InferenceSession(str(toy_bundle / "full.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, rows)
    assert got.shape == (batch,)
    np.testing.assert_allclose(got, _eager(loaded.module, loaded.spec, rows), atol=1e-5, rtol=0)


def test_onnx_io_is_named_by_the_spec(toy_bundle):
    m = Manifest.read(toy_bundle)
    sess = ort.InferenceSession(str(toy_bundle / "full.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [i.name for i in m.spec.inputs]
    assert [o.name for o in sess.get_outputs()] == ["ctr"]
    assert sess.get_inputs()[0].shape[0] == "batch"


def test_dict_argument_model_exports(tmp_path):
    spec = FeatureSpec.from_dict(DICT_SPEC)
    model = DictArgs().eval()
    export_bundle(LoadedModel(spec=spec, module=model), tmp_path / "b", ExportOptions(split=False, parity=False))
    rows = sample_rows(spec, 9, seed=3)
    sess = ort.InferenceSession(str(tmp_path / "b" / "full.onnx"), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in sess.get_inputs()) == sorted(rows)
    (got,) = sess.run(None, rows)
    np.testing.assert_allclose(got, _eager(model, spec, rows), atol=1e-6)


def test_spec_that_does_not_fit_the_model_is_refused(tmp_path):
    bad = json.loads(json.dumps(DICT_SPEC))
    bad["inputs"][0]["shape"] = [5]  # model's Linear expects 3 ids
    with pytest.raises(ExportError, match="does not run on inputs built from spec"):
        export_bundle(LoadedModel(spec=FeatureSpec.from_dict(bad), module=DictArgs()), tmp_path / "b")


def test_output_count_must_match_spec(tmp_path):
    two = json.loads(json.dumps(DICT_SPEC))
    two["outputs"] = ["ctr", "cvr"]
    with pytest.raises(ExportError, match="returns 1 output"):
        export_bundle(LoadedModel(spec=FeatureSpec.from_dict(two), module=DictArgs()), tmp_path / "b")
    assert not (tmp_path / "b").exists(), "a failed export must leave nothing behind"


def test_existing_bundle_needs_overwrite(toy_bundle, toy_checkpoint):
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(load_student(toy_checkpoint, trust=("tests",)), toy_bundle)
