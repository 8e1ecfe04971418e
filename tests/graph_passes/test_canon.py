"""Canonicalisation passes on tiny inline graphs: Gemm -> MatMul, per-token unroll, folding."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from graph_passes.onnx import (
    PASS_KEY,
    GemmToMatMulPass,
    UnrollBatchedMatMulPass,
    canonicalize_linear,
)

RNG = np.random.default_rng(0)


def _model(text: str, **inits: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model | onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


GEMM = """<ir_version: 8, opset_import: ["" : 18]>
g (float[B, 4] x) => (float[B, 3] y) { y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, w, b) }"""


def test_gemm_with_constant_weight_becomes_matmul_add():
    w, b = RNG.normal(size=(3, 4)).astype(np.float32), RNG.normal(size=(3,)).astype(np.float32)
    model = _model(GEMM, w=w, b=b)
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    result = GemmToMatMulPass()(model)
    assert result.modified
    assert _ops(result.model) == ["MatMul", "Add"]
    assert all(n.metadata_props[PASS_KEY] == "GemmToMatMulPass" for n in result.model.graph)
    # explicit numpy reference of Gemm semantics, not the original graph run through our code
    np.testing.assert_allclose(
        _run(result.model, x=x)[0], 0.5 * x @ w.T + 2.0 * b, rtol=1e-5, atol=1e-6
    )
    onnx.checker.check_model(ir.serde.serialize_model(result.model))
    assert result.model.graph.outputs[0].name == "y"


def test_gemm_refuses_non_constant_weight_and_says_why():
    text = """<ir_version: 8, opset_import: ["" : 18]>
    g (float[B, 4] x, float[3, 4] w) => (float[B, 3] y) { y = Gemm <transB = 1> (x, w) }"""
    model = _model(text)
    p = GemmToMatMulPass()
    result = p(model)
    assert not result.modified
    assert _ops(result.model) == ["Gemm"]
    assert [r.reason for r in p.refusals] == ["weight 'w' is not a constant"]


def test_per_token_batched_matmul_is_unrolled_into_2d_matmuls():
    t, d, h = 3, 4, 5
    w = RNG.normal(size=(t, d, h)).astype(np.float32)
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
    g (float[{t}, B, {d}] x) => (float[{t}, B, {h}] y) {{ y = MatMul (x, w) }}"""
    model = _model(text, w=w)
    x = RNG.normal(size=(t, 7, d)).astype(np.float32)
    result = UnrollBatchedMatMulPass()(model)
    assert result.modified
    ops = _ops(result.model)
    assert ops.count("MatMul") == t and ops[-1] == "Concat"
    for n in result.model.graph:
        if n.op_type == "MatMul":
            assert n.inputs[1].const_value.shape.dims == (d, h)
    np.testing.assert_allclose(
        _run(result.model, x=x)[0], np.einsum("tbd,tdh->tbh", x, w), rtol=1e-5, atol=1e-5
    )
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)


def test_unroll_refuses_unknown_rank_activation():
    w = RNG.normal(size=(2, 4, 5)).astype(np.float32)
    text = """<ir_version: 8, opset_import: ["" : 18]>
    g (float x) => (float y) { y = MatMul (x, w) }"""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(numpy_helper.from_array(w, "w"))
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    p = UnrollBatchedMatMulPass()
    assert not p(ir.serde.deserialize_model(proto)).modified
    assert "is not known to be rank 3" in p.refusals[0].reason


def test_canonicalize_folds_transposed_weight_and_removes_dead_code():
    w = RNG.normal(size=(3, 4)).astype(np.float32)
    text = """<ir_version: 8, opset_import: ["" : 18]>
    g (float[B, 4] x) => (float[B, 3] y) {
        wt = Transpose <perm = [1, 0]> (w)
        unused = Relu (x)
        y = MatMul (x, wt)
    }"""
    model = _model(text, w=w)
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    result = canonicalize_linear(model)
    assert result.modified
    assert _ops(result.model) == ["MatMul"]
    assert result.model.graph.node(0).inputs[1].const_value is not None
    np.testing.assert_allclose(_run(result.model, x=x)[0], x @ w.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_without_bias(trans_b):
    w = RNG.normal(size=(3, 4) if trans_b else (4, 3)).astype(np.float32)
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
    g (float[B, 4] x) => (float[B, 3] y) {{ y = Gemm <transB = {trans_b}> (x, w) }}"""
    result = GemmToMatMulPass()(_model(text, w=w))
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    assert _ops(result.model) == ["MatMul"]
    np.testing.assert_allclose(
        _run(result.model, x=x)[0], x @ (w.T if trans_b else w), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("eq", "x_shape", "w_shape"),
    [
        ("btd,tdh->bth", (6, 3, 4), (3, 4, 5)),
        ("bth,tdh->btd", (6, 3, 5), (3, 4, 5)),
        ("tbd,tdh->tbh", (3, 6, 4), (3, 4, 5)),
    ],
)
def test_per_token_einsum_is_unrolled(eq, x_shape, w_shape):
    w = RNG.normal(size=w_shape).astype(np.float32)
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
    g (float[{",".join(map(str, x_shape))}] x) => (float y) {{ y = Einsum <equation = "{eq}"> (x, w) }}"""
    model = _model(text, w=w)
    x = RNG.normal(size=x_shape).astype(np.float32)
    result = UnrollBatchedMatMulPass()(model)
    assert result.modified
    assert "Einsum" not in _ops(result.model)
    assert _ops(result.model).count("MatMul") == 3
    np.testing.assert_allclose(
        _run(result.model, x=x)[0], np.einsum(eq, x, w), rtol=1e-5, atol=1e-5
    )


def test_einsum_needing_activation_transpose_is_refused():
    w = RNG.normal(size=(3, 4, 5)).astype(np.float32)
    text = """<ir_version: 8, opset_import: ["" : 18]>
    g (float[4, 3, 6] x) => (float y) { y = Einsum <equation = "dtb,tdh->bth"> (x, w) }"""
    p = UnrollBatchedMatMulPass()
    assert not p(_model(text, w=w)).modified
    assert "transpose of the activation" in p.refusals[0].reason
