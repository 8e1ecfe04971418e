"""The readiness check on the reference students' bundles, fp32 and w8a16 (acceptance).

Each student (tiny, untrained: the graph structure is what TensorRT sees) goes through the
export steps once (capture, full.onnx, UG split); the fp32 bundle and the w8a16 bundle with
the TensorRT lowering (``--target trt``: DequantizeLinear on int8 weights, fp16 activations)
are written from that capture, and ``ugsep check --trt-lint`` must pass on both.
"""

from __future__ import annotations

import copy

import pytest
import torch

from exporter.cli import main
from exporter.load import LoadedModel
from exporter.pipeline import (
    ExportContext,
    ExportOptions,
    step_capture,
    step_full_onnx,
    step_split,
    step_write,
)
from exporter.steps.quantize import QuantizeStepOptions, step_quantize
from exporter.steps.tensorrt import step_trt_lint
from runtime.manifest import Manifest
from runtime.spec import FeatureSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["rankmixer", "dcn", "twotower"])
def captured(request):
    from students.zoo import build_student

    torch.manual_seed(0)
    model = build_student(request.param, "tiny").eval()
    loaded = LoadedModel(spec=FeatureSpec.from_dict(model.feature_spec()), module=model)
    ctx = ExportContext(loaded=loaded, out_dir=None, options=ExportOptions(parity_rows=64))
    for step in (step_capture, step_full_onnx, step_split):
        step(ctx)
    assert set(ctx.stages) == {"full", "user", "group"}, "every reference student splits"
    return request.param, ctx


def _bundle(captured, tmp_path, precision: str, target: str):
    kind, base = captured
    # every layer a candidate: on ORT CPU the default keeps these tiny weights fp32 for speed
    quantize = QuantizeStepOptions(min_elements=0, per_token_stages=("full", "user", "group"))
    options = ExportOptions(precision=precision, parity_rows=64, target=target, quantize=quantize)
    ctx = ExportContext(
        loaded=base.loaded,
        out_dir=tmp_path / f"{kind}-{precision}-{target}",
        options=options,
        program=base.program,
        input_names=base.input_names,
        stages=dict(base.stages),
        manifest_fields=copy.deepcopy(base.manifest_fields),
        extra_files=dict(base.extra_files),
    )
    step_quantize(ctx)
    return ctx


@pytest.mark.parametrize("precision", ["fp32", "w8a16"])
def test_student_bundles_are_ready_for_tensorrt(captured, tmp_path, precision, capsys):
    ctx = _bundle(captured, tmp_path, precision, "trt")
    if precision == "w8a16":
        ops = {n.op_type for m in ctx.stages.values() for n in m.graph.node}
        assert "DequantizeLinear" in ops, "the w8a16 bundle really carries quantized weights"
    step_trt_lint(ctx)  # what `ugsep export --target trt` runs before writing
    step_write(ctx)
    assert Manifest.read(ctx.out_dir).precision == precision
    assert main(["check", "--trt-lint", str(ctx.out_dir)]) == 0
    err = capsys.readouterr().err
    assert all(
        f"{s}.onnx: ready for TensorRT (0 error(s)" in err for s in ("full", "user", "group")
    )


@pytest.mark.parametrize("captured", ["dcn"], indirect=True)
def test_ort_cpu_lowering_is_caught_as_not_tensorrt_ready(captured, tmp_path, capsys):
    """w8a16 for ONNX Runtime CPU (MatMulNBits) is exactly what --target trt must avoid."""
    ctx = _bundle(captured, tmp_path, "w8a16", "onnx")
    step_write(ctx)
    assert main(["check", "--trt-lint", str(ctx.out_dir)]) == 1
    err = capsys.readouterr().err
    assert "com.microsoft::MatMulNBits" in err and "--target trt" in err
