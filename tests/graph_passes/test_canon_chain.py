"""UnrollPerTokenChainPass on tiny inline per-token FFNs: one Split/Concat per chain, no
transposes, bias folded into MatMulNBits; numbers against explicit numpy references."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import numpy_helper

from graph_passes.onnx import PASS_KEY, canonicalize_linear, quantize_onnx, quantize_weight
from graph_passes.onnx.canonicalize import UnrollPerTokenChainPass

RNG = np.random.default_rng(0)
T, D, H = 3, 16, 32

# the per-token FFN as optimize_inference leaves it: token-major MatMuls between transposes
FFN = f"""<ir_version: 8, opset_import: ["" : 18]>
g (float[B, {T}, {D}] x) => (float[B, {T}, {D}] y) {{
    xt = Transpose <perm = [1, 0, 2]> (x)
    m1 = MatMul (xt, w1)
    m1b = Transpose <perm = [1, 0, 2]> (m1)
    a1 = Add (m1b, b1)
    r = Relu (a1)
    rt = Transpose <perm = [1, 0, 2]> (r)
    m2 = MatMul (rt, w2)
    m2b = Transpose <perm = [1, 0, 2]> (m2)
    y = Add (b2, m2b)
}}"""


def _weights():
    return {
        "w1": RNG.normal(size=(T, D, H)).astype(np.float32) * 0.2,
        "b1": RNG.normal(size=(T, H)).astype(np.float32),
        "w2": RNG.normal(size=(T, H, D)).astype(np.float32) * 0.2,
        "b2": RNG.normal(size=(D,)).astype(np.float32),  # shared across tokens: broadcast
    }


def _model(text: str, **inits: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, **feeds: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _ffn_ref(x, w1, b1, w2, b2):
    r = np.maximum(np.einsum("btd,tdh->bth", x, w1) + b1, 0)
    return np.einsum("bth,thd->btd", r, w2) + b2


def test_ffn_chain_becomes_per_token_2d_chains_without_transposes():
    w = _weights()
    x = RNG.normal(size=(5, T, D)).astype(np.float32)
    p = UnrollPerTokenChainPass()
    result = p(_model(FFN, **w))
    assert result.modified
    ops = [n.op_type for n in result.model.graph]
    assert ops[:2] == ["Reshape", "Split"] and ops[-2:] == ["Concat", "Reshape"]
    assert ops[2:-2] == ["MatMul", "Add", "Relu", "MatMul", "Add"] * T
    assert "Transpose" not in ops
    assert all(n.metadata_props[PASS_KEY] == "UnrollPerTokenChainPass" for n in result.model.graph)
    mm = [n for n in result.model.graph if n.op_type == "MatMul"]
    assert [n.inputs[1].name for n in mm[:2]] == ["w1.t0", "w2.t0"]
    assert all(n.inputs[1].const_value.shape.dims in ((D, H), (H, D)) for n in mm)
    np.testing.assert_allclose(_run(result.model, x=x)[0], _ffn_ref(x, **w), rtol=1e-5, atol=1e-5)
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.output[0].name == "y"
    assert len(p.chains) == 1 and len(p.chains[0]) == 9


def test_quantized_chain_equals_dequantize_then_matmul_reference():
    w = _weights()
    x = RNG.normal(size=(4, T, D)).astype(np.float32)
    res = quantize_onnx(_model(FFN, **w), target="ort-cpu", accuracy_level=0)
    ops = [n.op_type for n in res.model.graph]
    assert ops.count("MatMulNBits") == 2 * T
    assert "Add" not in ops  # every per-token bias folded into its MatMulNBits
    assert sorted(name for _, name in res.quantized)[:2] == ["w1.t0", "w1.t1"]
    dq1 = np.stack([quantize_weight(w["w1"][t]).dequantize() for t in range(T)])
    dq2 = np.stack([quantize_weight(w["w2"][t]).dequantize() for t in range(T)])
    ref = _ffn_ref(x, dq1, w["b1"], dq2, w["b2"])
    np.testing.assert_allclose(_run(res.model, x=x)[0], ref, rtol=1e-4, atol=1e-4)
    onnx.checker.check_model(ir.serde.serialize_model(res.model))


def test_chain_stops_at_a_value_used_twice():
    text = FFN.replace(
        f"=> (float[B, {T}, {D}] y)", f"=> (float[B, {T}, {D}] y, float[B, {T}, {H}] r)"
    )
    w = _weights()
    x = RNG.normal(size=(2, T, D)).astype(np.float32)
    result = canonicalize_linear(_model(text, **w))
    y, r = _run(result.model, x=x)
    np.testing.assert_allclose(y, _ffn_ref(x, **w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        r, np.maximum(np.einsum("btd,tdh->bth", x, w["w1"]) + w["b1"], 0), rtol=1e-5, atol=1e-5
    )
    made = {n.metadata_props.get(PASS_KEY) for n in result.model.graph}
    assert "UnrollPerTokenChainPass" in made  # x -> r is one chain; r -> y another
    assert "Transpose" not in [n.op_type for n in result.model.graph]


def test_chain_refused_when_token_count_unknown_falls_back_to_split_unroll():
    text = FFN.replace(f"float[B, {T}, {D}] x", f"float[B, N, {D}] x")
    w = _weights()
    p = UnrollPerTokenChainPass()
    assert not p(_model(text, **w)).modified
    assert "is not known to be [B, 3, 16]" in p.refusals[0].reason
    result = canonicalize_linear(_model(text, **w))  # the per-layer unroll still applies
    made = {n.metadata_props.get(PASS_KEY) for n in result.model.graph}
    assert "UnrollBatchedMatMulPass" in made
    x = RNG.normal(size=(2, T, D)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x=x)[0], _ffn_ref(x, **w), rtol=1e-5, atol=1e-5)


def test_chain_kept_float_or_too_small_is_left_batched():
    w = _weights()
    x = RNG.normal(size=(2, T, D)).astype(np.float32)
    kept = canonicalize_linear(_model(FFN, **w), keep_batched=frozenset({"w1", "w2"}))
    ops = [n.op_type for n in kept.model.graph]
    assert "Split" not in ops and ops.count("MatMul") == 2
    assert {
        n.inputs[1].const_value.shape.dims for n in kept.model.graph if n.op_type == "MatMul"
    } == {
        (T, D, H),
        (T, H, D),
    }
    np.testing.assert_allclose(_run(kept.model, x=x)[0], _ffn_ref(x, **w), rtol=1e-5, atol=1e-5)
    p = UnrollPerTokenChainPass(min_elements=D * H + 1)  # W[t] has D*H elements
    assert not p(_model(FFN, **w)).modified and not p.refusals
    small = canonicalize_linear(_model(FFN, **w), unroll_min_elements=D * H + 1)
    assert "Split" not in [n.op_type for n in small.model.graph]
