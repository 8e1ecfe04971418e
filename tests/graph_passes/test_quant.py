"""QuantizeWeightsInt8Pass, MatMulNBits / fp16 lowering and weight-bytes accounting on inline graphs.

References are explicit numpy: quantize the weight by hand (symmetric, amax/qmax), dequantize,
matmul — never the pass's own helpers.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from graph_passes.onnx import (
    PASS_KEY,
    Fp16ActivationsPass,
    LowerToMatMulNBitsPass,
    QuantizeWeightsInt8Pass,
    linear_weight_bytes,
    quantize_onnx,
)

RNG = np.random.default_rng(1)
K, N = 64, 48
LINEAR = f"""<ir_version: 8, opset_import: ["" : 18]>
g (float[B, {K}] x) => (float[B, {N}] y) {{ h = MatMul (x, w)  y = Add (h, b) }}"""


def _model(text: str, **inits: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    so = ort.SessionOptions()
    # ORT fuses DequantizeLinear+MatMul into MatMulNBits with accuracy level 4 (int8
    # activations) by default; level 0 keeps fp32 activations so the check can be exact.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _ref_dequant(w: np.ndarray, qmax: int, block: int | None) -> np.ndarray:
    """Hand-written symmetric fake-quant: per column (block None) or per K-block of a column."""
    out = np.empty_like(w)
    rows = (
        [slice(0, w.shape[0])]
        if block is None
        else [slice(i, i + block) for i in range(0, w.shape[0], block)]
    )
    for r in rows:
        for j in range(w.shape[1]):
            col = w[r, j]
            s = np.abs(col).max() / qmax
            out[r, j] = np.clip(np.round(col / s), -qmax, qmax) * s
    return out


@pytest.fixture
def linear():
    w = RNG.normal(size=(K, N)).astype(np.float32)
    b = RNG.normal(size=(N,)).astype(np.float32)
    x = RNG.normal(size=(5, K)).astype(np.float32)
    return w, b, x


@pytest.mark.parametrize(("bits", "block"), [(8, None), (8, 16), (4, 32)])
def test_quantize_emits_dequantize_linear_matching_numpy_reference(linear, bits, block):
    w, b, x = linear
    result = QuantizeWeightsInt8Pass(bits=bits, block_size=block)(_model(LINEAR, w=w, b=b))
    assert result.modified
    model = result.model
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "MatMul", "Add"]
    dq = model.graph.node(0)
    assert dq.metadata_props[PASS_KEY] == "QuantizeWeightsInt8Pass"
    assert dq.inputs[0].dtype == (ir.DataType.INT8 if bits == 8 else ir.DataType.INT4)
    expected = x @ _ref_dequant(w, (1 << (bits - 1)) - 1, block) + b
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-5, atol=1e-4)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_quantize_refuses_non_constant_weight_and_skip_list(linear):
    w, b, _ = linear
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
    g (float[B, {K}] x, float[{K}, {N}] wx) => (float[B, {N}] y, float[B, {N}] z) {{
        y = MatMul (x, wx)
        z = MatMul <name="keep"> (x, w)
    }}"""
    p = QuantizeWeightsInt8Pass(skip={"w"})
    result = p(_model(text, w=w))
    assert not result.modified
    assert sorted(r.reason for r in p.refusals) == [
        "listed in skip: kept in float",
        "weight 'wx' is not a constant",
    ]


@pytest.mark.parametrize(
    ("bits", "block", "level"), [(8, None, 0), (8, None, 4), (8, 32, 0), (4, 32, 0)]
)
def test_matmul_nbits_lowering_equals_dequantize_then_matmul(linear, bits, block, level):
    w, b, x = linear
    qdq = QuantizeWeightsInt8Pass(bits=bits, block_size=block)(_model(LINEAR, w=w, b=b)).model
    reference = x @ _ref_dequant(w, (1 << (bits - 1)) - 1, block) + b
    lowered = LowerToMatMulNBitsPass(accuracy_level=level)(qdq)
    assert lowered.modified
    nodes = list(lowered.model.graph)
    assert [(n.domain, n.op_type) for n in nodes] == [
        ("com.microsoft", "MatMulNBits")
    ]  # bias fused
    assert nodes[0].attributes["bits"].value == bits
    assert nodes[0].metadata_props[PASS_KEY] == "LowerToMatMulNBitsPass"
    # level 4 quantizes activations to int8 per block inside the kernel: looser, still close
    tol = 1e-4 if level == 0 else 0.01 * np.abs(reference).max()
    np.testing.assert_allclose(_run(lowered.model, x), reference, rtol=0, atol=tol)
    onnx.checker.check_model(ir.serde.serialize_model(lowered.model))


def test_lowering_refuses_asymmetric_dequantize():
    q = RNG.integers(-100, 100, size=(K, N)).astype(np.int8)
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
    g (float[B, {K}] x) => (float[B, {N}] y) {{
        wf = DequantizeLinear <axis = 1> (q, s, zp)
        y = MatMul (x, wf)
    }}"""
    model = _model(text, q=q, s=np.ones(N, np.float32), zp=np.zeros(N, np.int8))
    p = LowerToMatMulNBitsPass()
    assert not p(model).modified
    assert (
        p.refusals[0].reason
        == "DequantizeLinear has a zero point (only symmetric weights are lowered)"
    )


def test_fp16_activation_pass_keeps_fp32_io(linear):
    w, b, x = linear
    qdq = QuantizeWeightsInt8Pass()(_model(LINEAR, w=w, b=b)).model
    result = Fp16ActivationsPass()(qdq)
    assert result.modified
    ops = [n.op_type for n in result.model.graph]
    assert ops == ["DequantizeLinear", "Cast", "MatMul", "Cast", "Add"]
    assert result.model.graph.node(0).inputs[1].dtype == ir.DataType.FLOAT16
    assert not any(v.dtype == ir.DataType.INT64 for n in result.model.graph for v in n.outputs)
    expected = x @ _ref_dequant(w, 127, None) + b
    np.testing.assert_allclose(
        _run(result.model, x), expected, rtol=0, atol=2e-3 * np.abs(expected).max()
    )
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)


def test_weight_bytes_of_quantized_layers_are_at_most_0_27_of_fp32(linear):
    w, b, _ = linear
    before = linear_weight_bytes(_model(LINEAR, w=w, b=b))
    assert before["fp32"] == before["quantized"] == K * N * 4
    for target in ("qdq", "ort-cpu", "gpu"):
        after = linear_weight_bytes(quantize_onnx(_model(LINEAR, w=w, b=b), target=target).model)
        assert after["quantized_layers"] == 1
        assert after["fp32"] == K * N * 4
        assert after["quantized"] / after["fp32"] <= 0.27, target


def test_gemm_model_through_whole_pipeline_for_ort():
    """Gemm (as torch exports nn.Linear) -> canonical MatMul -> int8 -> MatMulNBits."""
    w = RNG.normal(size=(N, K)).astype(np.float32)
    b = RNG.normal(size=(N,)).astype(np.float32)
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
    g (float[B, {K}] x) => (float[B, {N}] y) {{ y = Gemm <transB = 1> (x, w, b) }}"""
    x = RNG.normal(size=(3, K)).astype(np.float32)
    result = quantize_onnx(_model(text, w=w, b=b), target="ort-cpu", accuracy_level=0)
    assert [n.op_type for n in result.model.graph] == ["MatMulNBits"]
    assert len(result.quantized) == 1 and not result.refusals
    np.testing.assert_allclose(
        _run(result.model, x), x @ _ref_dequant(w.T.copy(), 127, None) + b, atol=1e-4
    )


def test_quantize_refuses_reduction_dim_too_small_to_gain():
    w = RNG.normal(size=(8, N)).astype(np.float32)
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
    g (float[B, 8] x) => (float[B, {N}] y) {{ y = MatMul (x, w) }}"""
    p = QuantizeWeightsInt8Pass()
    assert not p(_model(text, w=w)).modified
    assert p.refusals[0].reason == "weight 'w' has K=8 < min_k=16: too small to gain"
