"""ONNX external data: a graph over the size limit keeps its weights in a .data file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import runtime
from exporter import ExportOptions, LoadedModel, export_bundle
from exporter.capture import to_torch_inputs
from runtime.errors import BundleError
from runtime.sample import sample_rows
from runtime.spec import FeatureSpec
from tests.embstore.models import make_toy_lookups, toy_spec

pytestmark = pytest.mark.slow


def test_large_graph_is_written_with_external_data_and_served(tmp_path):
    spec = FeatureSpec.from_dict(toy_spec())
    model = make_toy_lookups(bags=False)
    out = tmp_path / "b"
    # every table in the graph, and a limit of 1 KiB: full.onnx goes over it
    export_bundle(LoadedModel(spec=spec, module=model), out, ExportOptions(
        split=False, parity_rows=200, extra={"store_min_bytes": 1 << 40, "external_data_bytes": 1024}))
    manifest = runtime.Bundle.open(out).manifest
    assert "full.onnx.data" in manifest.files  # sha256-verified like every other file
    onnx.checker.check_model(str(out / "full.onnx"))
    graph = onnx.load(str(out / "full.onnx"), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(
        {e.key: e.value for e in t.external_data}["location"] == "full.onnx.data" for t in external
    )  # relative to the bundle: the bundle can move
    assert (out / "full.onnx").stat().st_size < 64 * 1024 < (out / "full.onnx.data").stat().st_size
    rows = sample_rows(spec, 30, seed=4)
    scorer = runtime.load(out, "onnxruntime")
    got = scorer.score({s.name: rows[s.name][:1] for s in spec.user_inputs},
                       {s.name: rows[s.name] for s in spec.group_inputs})["ctr"]
    user_rows = {s.name: np.repeat(rows[s.name][:1], 30, 0) for s in spec.user_inputs}
    with torch.no_grad():
        want = model(**to_torch_inputs(spec, {**rows, **user_rows})).numpy()
    assert np.abs(got - want).max() < 1e-6
    data = out / "full.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="full.onnx.data"):
        runtime.Bundle.open(out)
