"""DynamicQuantizeMatMulPass (graph_passes/onnx/w8a8.py) on small graphs, run by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.onnx.w8a8 import DynamicQuantizeMatMulPass, weight_bits_for_cpu

K, N = 64, 32


def _mlp(bias_shape=(N,), output_is_matmul=False) -> onnx.ModelProto:
    """x[B, K] -> MatMul(W1) -> Add(b1) -> Relu -> MatMul(W2 [N, 8]) (-> Add(b2))."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((K, N)).astype(np.float32) / 8
    b1 = rng.standard_normal(bias_shape).astype(np.float32)
    w2 = rng.standard_normal((N, 8)).astype(np.float32) / 6
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run what the pass wrote
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _convert(proto: onnx.ModelProto, **kw) -> tuple[onnx.ModelProto, DynamicQuantizeMatMulPass]:
    model = ir.serde.deserialize_model(proto)
    p = DynamicQuantizeMatMulPass(**kw)
    p(model)
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    return out, p


@pytest.mark.parametrize("bits", [8, 7])
def test_matmuls_become_dynamic_quantize_matmul_close_to_fp32(bits):
    proto = _mlp()
    out, p = _convert(proto, weight_bits=bits)
    ops = [n.op_type for n in out.graph.node]
    # the Add of a constant [N] bias is folded into the first kernel; the second has no Add
    assert ops == ["DynamicQuantizeMatMul", "Relu", "DynamicQuantizeMatMul"], ops
    assert [w for _, w in p.quantized] == ["w1", "w2"]
    first = out.graph.node[0]
    assert first.input[4] == "b1" and first.input[3] == ""  # bias, no zero point (symmetric)
    assert {"w1", "w2"}.isdisjoint(t.name for t in out.graph.initializer)  # float weights gone
    x = np.random.default_rng(1).standard_normal((100, K)).astype(np.float32)
    ref, got = _run(proto, x), _run(out, x)
    err, scale = np.abs(got - ref), np.abs(ref).max()
    # int8 weights and per-tensor uint8 activations: close but not exact (measured here:
    # mean 0.4-0.5 % of the output range; max 2 % with 7-bit weights, 6 % with 8-bit ones on
    # an AVX2 CPU without VNNI, where u8s8 products saturate int16)
    assert 0 < err.mean() < 0.02 * scale and err.max() < 0.1 * scale, (err.mean(), err.max())


def test_weight_range_follows_bits():
    out, _ = _convert(_mlp(), weight_bits=7)
    q = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name.startswith("w1_w8a8_q")))
    assert q.dtype == np.int8 and np.abs(q).max() == 63
    out8, _ = _convert(_mlp(), weight_bits=8)
    q8 = numpy_helper.to_array(next(t for t in out8.graph.initializer if t.name.startswith("w1_w8a8_q")))
    assert np.abs(q8).max() == 127


def test_only_and_min_elements_leave_layers_float():
    out, p = _convert(_mlp(), only=["w2"])
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Add", "Relu", "DynamicQuantizeMatMul"]
    assert any("not selected" in r.reason for r in p.refusals)
    out, p = _convert(_mlp(), min_elements=K * N)  # w2 (N x 8) is smaller
    assert [n.op_type for n in out.graph.node] == ["DynamicQuantizeMatMul", "Relu", "MatMul"]


def test_a_row_vector_bias_is_folded_and_a_graph_output_keeps_its_name():
    proto = _mlp(bias_shape=(1, N))
    out, _ = _convert(proto)
    assert out.graph.node[0].op_type == "DynamicQuantizeMatMul" and out.graph.node[0].input[4]
    assert [o.name for o in out.graph.output] == ["y"]
    x = np.random.default_rng(2).standard_normal((5, K)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(proto, x), atol=0.1 * np.abs(_run(proto, x)).max())


def test_weight_bits_for_cpu():
    assert weight_bits_for_cpu(["sse4_2", "avx", "avx2", "fma"]) == 7  # x86-64 without VNNI
    assert weight_bits_for_cpu(["avx2", "avx512f", "avx512_vnni"]) == 8
    assert weight_bits_for_cpu(["avx2", "avx_vnni"]) == 8
    assert weight_bits_for_cpu(["fp", "asimd", "asimddp"]) == 8  # Arm


def test_cpu_summary_names_the_int8_path_the_figures_depend_on():
    from exporter.timing import cpu_summary

    zen3 = ["sse4_2", "avx", "avx2", "fma"]
    zen4 = zen3 + ["avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"]
    assert cpu_summary("Zen 3", zen3) == {"name": "Zen 3", "simd": "avx2", "int8_dot": None, "bf16": False}
    assert cpu_summary("Zen 4", zen4) == {"name": "Zen 4", "simd": "avx512", "int8_dot": "avx512_vnni",
                                          "bf16": True}
    assert cpu_summary("Alder Lake", zen3 + ["avx_vnni"])["int8_dot"] == "avx_vnni"
    # the same flags decide w8a8's weight bits: no int8 dot product -> 7-bit weights
    assert (cpu_summary("z", zen3)["int8_dot"] is None) == (weight_bits_for_cpu(zen3) == 7)
    assert cpu_summary("here")["name"] == "here"  # this machine's flags, any CPU
