"""Per-token Einsum -> broadcast MatMul (graph_passes.onnx.per_token) on tiny inline graphs,
and the exporter's ``optimize`` step on a torch.export'ed per-token FFN vs eager."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from graph_passes.onnx import (
    PASS_KEY,
    PerTokenEinsumToMatMulPass,
    UnrollBatchedMatMulPass,
    quantize_onnx,
)

RNG = np.random.default_rng(0)
PASS = "PerTokenEinsumToMatMulPass"


def _proto(text: str, **inits: np.ndarray) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(proto)
    return proto


def _run(model: ir.Model | onnx.ModelProto, **feeds: np.ndarray) -> np.ndarray:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize(
    ("eq", "x_shape", "w_shape", "ops"),
    [
        ("btd,tdh->bth", (6, 3, 4), (3, 4, 5), ["Transpose", "MatMul", "Transpose"]),
        ("bth,thd->btd", (6, 3, 5), (3, 5, 4), ["Transpose", "MatMul", "Transpose"]),
        ("btd,thd->bth", (6, 3, 4), (3, 5, 4), ["Transpose", "MatMul", "Transpose"]),  # [T,H,D]
        ("tbd,tdh->tbh", (3, 6, 4), (3, 4, 5), ["MatMul"]),  # already token-major
    ],
)
def test_per_token_einsum_becomes_broadcast_matmul(eq, x_shape, w_shape, ops):
    w = RNG.normal(size=w_shape).astype(np.float32)
    x = RNG.normal(size=x_shape).astype(np.float32)
    ref = np.einsum(eq, x, w)
    x_dims, y_dims = (
        ",".join("B" if i == eq.index("b") else str(n) for i, n in enumerate(shape))
        for shape in (x_shape, ref.shape)
    )
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
    g (float[{x_dims}] x) => (float[{y_dims}] y) {{ y = Einsum <equation = "{eq}"> (x, w) }}"""
    original = _proto(text, w=w)
    result = PerTokenEinsumToMatMulPass()(ir.serde.deserialize_model(original))
    assert result.modified
    assert _ops(result.model) == ops
    assert all(n.metadata_props[PASS_KEY] == PASS for n in result.model.graph)
    matmul = next(n for n in result.model.graph if n.op_type == "MatMul")
    t, d, h = w_shape[0], x_shape[-1], ref.shape[-1]
    assert matmul.inputs[1].const_value.shape.dims == (t, d, h)  # [T, D, H] whatever came in
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.output[0].name == "y"
    got = _run(proto, x=x)
    np.testing.assert_allclose(got, _run(original, x=x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_einsum_needing_activation_transpose_is_refused_with_reason():
    w = RNG.normal(size=(3, 4, 5)).astype(np.float32)
    text = """<ir_version: 8, opset_import: ["" : 18]>
    g (float[4, 3, 6] x) => (float y) { y = Einsum <equation = "dtb,tdh->bth"> (x, w) }"""
    p = PerTokenEinsumToMatMulPass()
    result = p(ir.serde.deserialize_model(_proto(text, w=w)))
    assert not result.modified
    assert _ops(result.model) == ["Einsum"]
    assert "would need a transpose of the activation" in p.refusals[0].reason


def test_einsum_without_constant_weight_is_not_a_per_token_layer():
    text = """<ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 3, 4] x, float[3, 4, 5] w) => (float y) {
        y = Einsum <equation = "btd,tdh->bth"> (x, w)
    }"""
    p = PerTokenEinsumToMatMulPass()
    assert not p(ir.serde.deserialize_model(_proto(text))).modified
    assert p.refusals == []


FFN = """<ir_version: 8, opset_import: ["" : 18]>
g (float[B, 3, 16] x) => (float[B, 3, 16] y) {
    h = Einsum <equation = "btd,tdh->bth"> (x, w1)
    a = Add (h, b1)
    r = Relu (a)
    o = Einsum <equation = "bth,thd->btd"> (r, w2)
    y = Add (o, x)
}"""


def _ffn() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    w = {
        "w1": RNG.normal(size=(3, 16, 32)).astype(np.float32) / 4,
        "b1": RNG.normal(size=(3, 32)).astype(np.float32),
        "w2": RNG.normal(size=(3, 32, 16)).astype(np.float32) / 6,
    }
    return _proto(FFN, **w), w


def test_quant_unroll_takes_the_matmul_form_and_keeps_layer_names():
    original, _ = _ffn()
    model = ir.serde.deserialize_model(original)
    PerTokenEinsumToMatMulPass()(model)
    x = RNG.normal(size=(5, 3, 16)).astype(np.float32)
    unroll = UnrollBatchedMatMulPass()
    assert unroll(model).modified, unroll.refusals
    weights = [n.inputs[1].name for n in model.graph if n.op_type == "MatMul"]
    assert weights == [f"w{i}.t{t}" for i in (1, 2) for t in range(3)]  # quant layer names
    np.testing.assert_allclose(_run(model, x=x), _run(original, x=x), rtol=1e-5, atol=1e-5)


def test_optimized_ffn_quantizes_to_matmulnbits():
    original, _ = _ffn()
    model = ir.serde.deserialize_model(original)
    PerTokenEinsumToMatMulPass()(model)
    res = quantize_onnx(model, target="ort-cpu")  # canonicalize_linear unrolls the MatMul form
    assert "Einsum" not in _ops(res.model)
    assert _ops(res.model).count("MatMulNBits") == 6 and len(res.quantized) == 6
    proto = ir.serde.serialize_model(res.model)
    onnx.checker.check_model(proto)
    x = RNG.normal(size=(5, 3, 16)).astype(np.float32)
    ref = _run(original, x=x)
    err = np.abs(_run(proto, x=x) - ref).max()
    assert 0 < err < 0.05 * np.abs(ref).max()  # int8 weights: close, not equal


class _PerTokenFFN(torch.nn.Module):
    def __init__(self, t: int = 4, d: int = 32, h: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(t, d, h) / d**0.5)
        self.b1 = torch.nn.Parameter(torch.randn(t, h))
        self.w2 = torch.nn.Parameter(torch.randn(t, h, d) / h**0.5)
        self.ln = torch.nn.LayerNorm(d)

    def forward(self, x):
        h = torch.relu(torch.einsum("btd,tdh->bth", x, self.w1) + self.b1)
        return self.ln(x + torch.einsum("bth,thd->btd", h, self.w2))


def test_optimize_step_on_exported_ffn_matches_eager():
    from exporter.steps.onnx_build import export_onnx
    from exporter.steps.optimize import optimize_stage

    model = _PerTokenFFN().eval()
    x = torch.randn(7, 4, 32)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    proto = export_onnx(program, ["x"], ["y"])
    assert "Einsum" in [n.op_type for n in proto.graph.node]
    optimized, made = optimize_stage(proto)
    ops = [n.op_type for n in optimized.graph.node]
    assert "Einsum" not in ops and ops.count("MatMul") == 2
    assert made == {PASS: 6}  # 2 x (Transpose, MatMul, Transpose)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(_run(optimized, x=x.numpy()) - ref).max() <= 1e-5
