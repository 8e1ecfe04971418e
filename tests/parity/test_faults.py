"""Planted faults are caught by parity AND localised to the layer that holds them.

Each test plants one bug in a real bundle's ONNX (then re-hashes the bundle so the
integrity check cannot be what catches it), runs check_bundle against the eager model,
and asserts the failing stage, the first diverging tensor's module and graph.
"""

from __future__ import annotations

import pytest
import torch

from exporter import ExportOptions, LoadedModel, export_bundle
from exporter.steps.parity import check_bundle
from runtime.manifest import Manifest
from runtime.spec import FeatureSpec
from tests.parity.conftest import boundary_names
from tests.parity.faults import quantize_weight, rehash, scale_weight, swap_inputs, transpose_input


def _first(report, stage):
    loc = report.stage(stage).localisation
    assert loc is not None, f"stage {stage} was not localised"
    assert loc["first_divergence"] is not None, loc
    return loc["first_divergence"]


def test_scaled_weight_in_group_graph(split_bundle, split_model):
    scale_weight(split_bundle, "group.onnx", "group.cross", 1.5)
    report = check_bundle(split_bundle, split_model, n_rows=300, progress=False)
    assert report.failed_stages == ["onnx-split"]  # full.onnx is untouched and passes
    first = _first(report, "onnx-split")
    assert (first["graph"], first["module"], first["op"]) == (
        "group.onnx",
        "group.cross",
        "aten.linear.default",
    )
    assert "self.cross(" in first["code"]
    assert report.stage("onnx-split").localisation["last_agreeing"] is not None


def test_scaled_weight_in_full_graph_user_layer(split_bundle, split_model):
    scale_weight(split_bundle, "full.onnx", "user.proj_b", 0.5)
    report = check_bundle(split_bundle, split_model, n_rows=300, progress=False)
    assert report.failed_stages == ["onnx-full"]
    first = _first(report, "onnx-full")
    assert (first["graph"], first["module"]) == ("full.onnx", "user.proj_b")


def test_swapped_boundary_tensor(split_bundle, split_model):
    a, b = boundary_names(split_bundle)  # two [M, 8] tensors: swapping them type-checks
    swap_inputs(split_bundle, "group.onnx", a, b)
    report = check_bundle(split_bundle, split_model, n_rows=300, progress=False)
    assert report.failed_stages == ["onnx-split"]
    first = _first(report, "onnx-split")
    # the user graph agrees; the first wrong tensor is where group.onnx gathers a boundary
    assert (first["graph"], first["module"], first["op"]) == (
        "group.onnx",
        "group",
        "aten.index.Tensor",
    )
    assert "user_a[user_index]" in first["code"]


def test_wrong_quantization_scale(split_bundle, split_model):
    # two int8 layers in group.onnx: item_mlp.0 quantized correctly, cross with its scales x3
    quantize_weight(split_bundle, "group.onnx", "group.item_mlp.0")
    quantize_weight(split_bundle, "group.onnx", "group.cross", scale_error=3.0)
    rehash(split_bundle, "group.onnx", precision="w8a16")
    report = check_bundle(split_bundle, split_model, n_rows=300, progress=False)
    assert report.failed_stages == ["onnx-split-w8a16"]
    first = _first(report, "onnx-split-w8a16")
    assert (first["graph"], first["module"]) == ("group.onnx", "group.cross")


def test_correct_quantization_passes_quantized_budgets(split_bundle, split_model):
    quantize_weight(split_bundle, "group.onnx", "group.item_mlp.0")
    quantize_weight(split_bundle, "group.onnx", "group.cross")
    rehash(split_bundle, "group.onnx", precision="w8a16")
    report = check_bundle(split_bundle, split_model, n_rows=300, progress=False)
    assert report.passed, report.summary()
    split = report.stage("onnx-split-w8a16")
    assert 0 < split.outputs["ctr"]["max_abs"] < 0.05  # quantized: not bit-exact, within budget
    assert split.budgets["top10_overlap_mean"] == 0.95


class SeqModel(torch.nn.Module):
    """A user behaviour sequence [B, 4, 4] read position-wise, crossed with an item."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.seq_proj = torch.nn.Linear(4, 6)
        self.item = torch.nn.Embedding(20, 6)
        self.head = torch.nn.Linear(6, 1)

    def forward(self, user_seq, item_ids):
        u = torch.relu(self.seq_proj(user_seq)).mean(1)
        return torch.sigmoid(self.head(u * self.item(item_ids).squeeze(1))).squeeze(-1)


SEQ_SPEC = {
    "name": "seq",
    "inputs": [
        {"name": "user_seq", "side": "user", "dtype": "float32", "shape": [4, 4]},
        {"name": "item_ids", "side": "group", "dtype": "int64", "shape": [1], "vocab": 20},
    ],
    "outputs": ["ctr"],
}


@pytest.fixture(scope="module")
def seq_bundle_master(tmp_path_factory):
    model = SeqModel().eval()
    out = tmp_path_factory.mktemp("seq") / "bundle"
    spec = FeatureSpec.from_dict(SEQ_SPEC)
    export_bundle(
        LoadedModel(spec=spec, module=model), out, ExportOptions(split=False, parity=False)
    )
    return out, model


def test_transposed_input(seq_bundle_master, tmp_path):
    import shutil

    master, model = seq_bundle_master
    bundle = shutil.copytree(master, tmp_path / "b")
    transpose_input(bundle, "full.onnx", "user_seq", [0, 2, 1])
    assert Manifest.read(bundle).precision == "fp32"
    report = check_bundle(bundle, model, n_rows=200, progress=False)
    assert report.failed_stages == ["onnx-full"]
    first = _first(report, "onnx-full")
    assert (first["graph"], first["module"]) == ("full.onnx", "seq_proj")
    assert "self.seq_proj(user_seq)" in first["code"]


@pytest.fixture(scope="module")
def w8_bundle_master(split_bundle_master, tmp_path_factory):
    """The split bundle through the real weight-only int8 quantizer (every layer int8)."""
    import onnx

    from exporter.steps.quantize import QuantizeOptions, quantize_bundle_stages
    from exporter.steps.write import BundleWriter

    m = Manifest.read(split_bundle_master)
    stages = {k: onnx.load(str(split_bundle_master / v.file)) for k, v in m.stages.items()}
    every = QuantizeOptions(min_elements=0, per_token_stages=("full", "user", "group"))
    quantized, record = quantize_bundle_stages(stages, m.spec, options=every)
    out = tmp_path_factory.mktemp("w8") / "bundle"
    w = BundleWriter(out)
    for stage, proto in quantized.items():
        w.add_stage(stage, f"{stage}.onnx", proto)
    w.finish(
        model_name=m.model_name, spec=m.spec, split=m.split, precision="w8a16", quantization=record
    )
    return out


def test_wrong_scale_in_a_real_matmulnbits(w8_bundle_master, split_model, tmp_path):
    import shutil

    import onnx
    from onnx import numpy_helper

    bundle = shutil.copytree(w8_bundle_master, tmp_path / "b")
    model = onnx.load(str(bundle / "group.onnx"))
    nbits = [
        n
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
        and any(p.key == "ugsep.weight" and "cross" in p.value for p in n.metadata_props)
    ]
    assert len(nbits) == 1, [n.name for n in model.graph.node if n.op_type == "MatMulNBits"]
    scales = next(t for t in model.graph.initializer if t.name == nbits[0].input[2])
    arr = numpy_helper.to_array(scales)
    scales.CopyFrom(numpy_helper.from_array((arr * 3).astype(arr.dtype), scales.name))
    onnx.save(model, str(bundle / "group.onnx"))
    rehash(bundle, "group.onnx")
    report = check_bundle(bundle, split_model, n_rows=300, progress=False)
    assert report.failed_stages == ["onnx-split-w8a16"], report.summary()
    loc = report.stage("onnx-split-w8a16").localisation
    first = loc["first_divergence"]
    assert first["graph"] == "group.onnx" and first["module"].startswith("group")
    named = first["module"] == "group.cross" or any(
        "cross" in u.get("weight", "") for u in loc["upstream"]
    )
    assert named, loc
