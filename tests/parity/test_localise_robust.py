"""Localisation by a robust error measure, blaming the layer that computes, not a view.

The model (written here) has a near-zero user-side tensor (the difference of two almost
equal projections: values ~1e-7, so float noise is ~100% of each element) upstream of a
group-side layer whose output is only read through a ``view``. The bundle goes through
the real W8 quantizer; then that layer's MatMulNBits scales are planted 3x too large.
Localisation must name that layer (with its source line), not the near-zero tensor and
not the view.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from exporter import ExportOptions, LoadedModel, export_bundle
from exporter.steps.parity import check_bundle
from exporter.steps.parity.localise import rms_error
from exporter.steps.quantize import QuantizeStepOptions
from exporter.steps.threads import ThreadsOptions
from runtime.spec import FeatureSpec
from tests.parity.faults import rehash

SPEC = {
    "name": "viewed",
    "inputs": [
        {"name": "u_x", "side": "user", "dtype": "float32", "shape": [12]},
        {"name": "i_x", "side": "group", "dtype": "float32", "shape": [24]},
    ],
    "outputs": ["ctr"],
}


class Viewed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.u_a = nn.Linear(12, 32, bias=False)  # K=12 < 16: stays fp32
        self.u_b = nn.Linear(12, 32, bias=False)
        with torch.no_grad():
            self.u_b.weight.copy_(self.u_a.weight * (1 + 1e-6))
        self.u = nn.Linear(12, 32)
        self.mix = nn.Linear(24, 32)
        self.head = nn.Linear(32, 1)

    def forward(self, u_x, i_x):
        tiny = self.u_a(u_x) - self.u_b(u_x)  # ~1e-7: near zero, float noise everywhere
        user = torch.tanh(self.u(u_x)) + tiny
        m = self.mix(i_x).view(-1, 4, 8)  # the layer under test, read through a view
        x = torch.relu(m).flatten(1) * user
        return torch.sigmoid(self.head(x)).squeeze(-1)


@pytest.fixture(scope="module")
def viewed_bundle(tmp_path_factory):
    model = Viewed().eval()
    out = tmp_path_factory.mktemp("viewed") / "bundle"
    opts = ExportOptions(precision="w8a16", parity=False,
                         quantize=QuantizeStepOptions(min_elements=0, per_token_stages=("full", "user", "group"),
                                                      tune=False),
                         threads=ThreadsOptions(enabled=False))
    export_bundle(LoadedModel(FeatureSpec.from_dict(SPEC), module=model), out, opts)
    return out, model


def _plant_wrong_scale(bundle, rel: str, weight: str) -> None:
    model = onnx.load(str(bundle / rel))
    nbits = [
        n for n in model.graph.node
        if n.op_type == "MatMulNBits"
        and any(p.key == "ugsep.weight" and weight in p.value for p in n.metadata_props)
    ]
    assert len(nbits) == 1, [n.name for n in model.graph.node]
    scales = next(t for t in model.graph.initializer if t.name == nbits[0].input[2])
    arr = numpy_helper.to_array(scales)
    scales.CopyFrom(numpy_helper.from_array((arr * 3).astype(arr.dtype), scales.name))
    onnx.save(model, str(bundle / rel))
    rehash(bundle, rel)


def test_rms_error_ignores_float_noise_on_near_zero_tensors():
    ref = np.full(1000, 1e-7)
    got = ref + np.random.default_rng(0).normal(scale=1e-7, size=1000)
    assert rms_error(ref, got) > 0.5  # relative to itself: noise looks like 100% error
    assert rms_error(ref, got, floor=0.01) < 1e-4  # against the graph's scale: nothing
    big = np.linspace(-1, 1, 1000)
    assert rms_error(big, big * 1.1, floor=0.01) == pytest.approx(0.1)


@pytest.mark.slow
def test_wrong_scale_is_blamed_on_the_layer_not_a_view(viewed_bundle, tmp_path):
    master, model = viewed_bundle
    bundle = shutil.copytree(master, tmp_path / "b")
    _plant_wrong_scale(bundle, "group.onnx", "mix")
    report = check_bundle(bundle, model, n_rows=300, progress=False, configs=False)
    assert "onnx-split-w8a16" in report.failed_stages, report.summary()
    loc = report.stage("onnx-split-w8a16").localisation
    first = loc["first_divergence"]
    assert first is not None, loc
    assert first["module"] == "mix" and "linear" in first["op"], first
    assert "self.mix(i_x)" in first["code"]
    assert first["graph"] == "group.onnx"
    assert "view" not in first["op"]
    assert loc["measure"].startswith("rms(error)")
