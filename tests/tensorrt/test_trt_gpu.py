"""TensorRT on a real GPU: engine build, parity vs eager, wrong-GPU refusal.

Marked ``gpu``; skipped, with the reason, where TensorRT or an NVIDIA GPU is missing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import runtime
from exporter.steps.capture import to_torch_inputs
from exporter.steps.tensorrt import build_engines
from exporter.steps.write import update_bundle
from runtime.backends.tensorrt import TrtBackend
from runtime.bundle import Bundle
from runtime.errors import BackendUnavailableError
from runtime.sample import sample_rows
from runtime.spec import FeatureSpec

_REASON = TrtBackend.availability(None)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        _REASON is not None, reason=f"no NVIDIA GPU / tensorrt not installed: {_REASON}"
    ),
]

FP16_ATOL = 2e-3  # probabilities; fp16 kernels on a tiny MLP
W8A16_ATOL = 2e-2  # the quantization budget's order of magnitude for probabilities


def _score(scorer, spec: FeatureSpec, n: int, seed: int):
    user_rows, cand = sample_rows(spec, 1, seed), sample_rows(spec, n, seed + 1)
    user = {s.name: user_rows[s.name][0] for s in spec.user_inputs}
    items = {s.name: cand[s.name] for s in spec.group_inputs}
    full = {
        s.name: np.repeat(user[s.name][None], n, 0) if s.side == "user" else items[s.name]
        for s in spec.inputs
    }
    return scorer.score(user, items)[spec.outputs[0]], full


def _eager(model, spec, full) -> np.ndarray:
    with torch.no_grad():
        return model(**to_torch_inputs(spec, full)).reshape(-1).numpy()


def test_build_engines_records_them_and_runtime_matches_eager(trt_split_bundle, tmp_path):
    from tests.parity.conftest import SplitToy

    entry = build_engines(trt_split_bundle, m="1,2,8", n="1,64,512", cache_dir=tmp_path)
    bundle = Bundle.open(trt_split_bundle)  # verifies every file, plans included
    assert bundle.manifest.engines == [entry]
    assert {f"{entry.dir}/user.plan", f"{entry.dir}/group.plan"} <= set(bundle.manifest.files)
    assert (trt_split_bundle / entry.dir / "build.log").stat().st_size > 0
    assert any(tmp_path.rglob("*.timing-cache"))
    scorer = runtime.load(trt_split_bundle, backend="tensorrt", allow_unverified=True)
    spec = bundle.manifest.spec
    for n in (1, 7, 300):
        got, full = _score(scorer, spec, n, seed=n)
        ref = _eager(SplitToy().eval(), spec, full)
        assert np.abs(got - ref).max() <= FP16_ATOL, n


def test_w8a16_engine_matches_eager_within_budget(tmp_path):
    from exporter.load import LoadedModel
    from exporter.pipeline import (
        ExportContext,
        ExportOptions,
        step_capture,
        step_full_onnx,
        step_split,
        step_write,
    )
    from exporter.steps.quantize import step_quantize
    from tests.parity.conftest import SPLIT_SPEC, SplitToy

    model, spec = SplitToy().eval(), FeatureSpec.from_dict(SPLIT_SPEC)
    opts = ExportOptions(precision="w8a16", target="trt")
    ctx = ExportContext(
        loaded=LoadedModel(spec=spec, module=model), out_dir=tmp_path / "b", options=opts
    )
    for step in (step_capture, step_full_onnx, step_split, step_quantize, step_write):
        step(ctx)
    entry = build_engines(ctx.out_dir, cache_dir=tmp_path / "cache")
    assert entry.precision == "strongly-typed"
    scorer = runtime.load(ctx.out_dir, backend="tensorrt", allow_unverified=True)
    got, full = _score(scorer, spec, 200, seed=3)
    assert np.abs(got - _eager(model, spec, full)).max() <= W8A16_ATOL


def test_engine_for_another_gpu_is_refused(trt_split_bundle, tmp_path):
    entry = build_engines(trt_split_bundle, m="1,1,4", n="1,8,64", cache_dir=tmp_path)
    other = copy.deepcopy(entry)
    other.gpu, other.compute_capability = "Some Other GPU", "1.0"
    update_bundle(trt_split_bundle, {}, engines=[other])
    with pytest.raises(BackendUnavailableError, match="no TensorRT engine for this machine"):
        runtime.load(trt_split_bundle, backend="tensorrt", allow_unverified=True)
    scorer = runtime.load(trt_split_bundle, backend="auto", allow_unverified=True)
    assert scorer.backend.name != "tensorrt"  # auto falls back and says which it picked
