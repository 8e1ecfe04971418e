"""Localisation on a bundle whose embedding tables left the graphs for the store.

The stage graphs of such a bundle take the gathered rows (``emb0__user_ids``), not the ids the
spec's rows carry; localisation must feed them from the bundle's store like the runtime does.
A fault planted in the group graph's head must be found and named, on the split and the full
graph alike."""

from __future__ import annotations

import shutil

import pytest

from exporter import ExportOptions, LoadedModel, export_bundle
from exporter.steps.embeddings import EmbeddingsOptions
from exporter.steps.parity import check_bundle
from runtime.manifest import Manifest
from runtime.spec import FeatureSpec
from tests.conftest import TOY_SPEC, make_toy_model
from tests.parity.faults import scale_weight


@pytest.fixture(scope="module")
def store_bundle(tmp_path_factory):
    model = make_toy_model(3)
    out = tmp_path_factory.mktemp("locstore") / "bundle"
    export_bundle(LoadedModel(FeatureSpec.from_dict(TOY_SPEC), module=model), out,
                  ExportOptions(parity=False, embeddings=EmbeddingsOptions(min_bytes=0)))
    lookups = Manifest.read(out).embeddings.lookups
    assert {lk.side for lk in lookups} == {"user", "group"}  # both tables are in the store
    return out, model


@pytest.mark.parametrize("graph", ["group.onnx", "full.onnx"])
def test_a_fault_is_localised_through_the_store(store_bundle, tmp_path, graph):
    master, model = store_bundle
    bundle = shutil.copytree(master, tmp_path / "b")
    scale_weight(bundle, graph, "head", 3.0)
    report = check_bundle(bundle, model, n_rows=200, progress=False, configs=False)
    stage = "onnx-split" if graph == "group.onnx" else "onnx-full"
    assert stage in report.failed_stages, report.summary()
    loc = report.stage(stage).localisation
    assert "note" not in loc or "localisation failed" not in loc["note"], loc
    first = loc["first_divergence"]
    assert first is not None and first["module"] == "head" and first["graph"] == graph, first
