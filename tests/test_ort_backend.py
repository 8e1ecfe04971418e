"""The ONNX Runtime CPU backend's session settings do what they claim, on real sessions."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from runtime.backends.ort import OrtBackend


def _add_layernorm_model(path) -> None:
    """x + skip -> LayerNormalization: the pattern ORT fuses into SkipLayerNormalization."""
    d = 16
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=d).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(size=d).astype(np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("Add", ["x", "skip"], ["s"]),
        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 8, d]) for n in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8, d])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def _optimized_ops(backend: OrtBackend, src, dst) -> set[str]:
    so = backend.session_options()
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(dst)).graph.node}


def test_skip_layernorm_fusion_is_disabled_by_default_and_can_be_enabled(tmp_path):
    src = tmp_path / "m.onnx"
    _add_layernorm_model(src)
    default = _optimized_ops(OrtBackend(), src, tmp_path / "a.onnx")
    assert "SkipLayerNormalization" not in default and "LayerNormalization" in default
    fused = _optimized_ops(OrtBackend(disabled_optimizers=()), src, tmp_path / "b.onnx")
    assert "SkipLayerNormalization" in fused  # ORT does fuse it when allowed


def test_unfused_session_matches_numpy_layernorm(tmp_path):
    src = tmp_path / "m.onnx"
    _add_layernorm_model(src)
    sess = OrtBackend(intra_op_threads=2).open_path(str(src))
    rng = np.random.default_rng(1)
    x, skip = (rng.normal(size=(5, 8, 16)).astype(np.float32) for _ in range(2))
    got = sess.run({"x": x, "skip": skip})["y"]
    m = onnx.load(str(src))
    gamma, beta = (numpy_helper.to_array(t) for t in m.graph.initializer)
    s = (x + skip).astype(np.float64)
    ref = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_spinning_is_off_unless_asked_for():
    assert OrtBackend().session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
    assert OrtBackend(allow_spinning=True).session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "1"
