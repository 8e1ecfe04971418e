"""HoistGatheredConcatPass (graph_passes.onnx.hoist_gathered) on inline graphs shaped like
RankMixer's token mixing in a split group graph, against numpy; the exported bench-shaped
student's group graph is covered in tests/test_split_e2e.py (scores vs eager)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from graph_passes.onnx import PASS_KEY, HoistGatheredConcatPass, optimize_inference

RNG = np.random.default_rng(0)
PASS = "HoistGatheredConcatPass"
M, N, T, D, HEADS = 3, 7, 4, 8, 4  # users, candidates, tokens per side, width, heads


def _mixing_graph(slice_axis: int = 2, perm: str = "0, 2, 1, 3", extra_use: bool = False) -> onnx.ModelProto:
    """y = Reshape(Transpose(Slice(Reshape(Concat([Gather(u, idx), c], axis=1)))))."""
    hd = D // HEADS
    half = HEADS // 2
    starts, ends = ([half], [HEADS]) if slice_axis == 2 else ([T], [2 * T])
    extra = ", float[N, 8, 8] z" if extra_use else ""
    extra_z = "z = Identity (cat)" if extra_use else ""
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
    g (float[M, {T}, {D}] u, float[N, {T}, {D}] c, int64[N] idx) => (float[N, {half}, {2 * T * hd}] y{extra}) {{
        ug = Gather <axis = 0> (u, idx)
        cat = Concat <axis = 1> (ug, c)
        v = Reshape <allowzero = 1> (cat, shape4)
        s = Slice (v, starts, ends, axes)
        t = Transpose <perm = [{perm}]> (s)
        y = Reshape <allowzero = 1> (t, shape3)
        {extra_z}
    }}"""
    proto = onnx.parser.parse_model(text)
    inits = {
        "shape4": np.array([-1, 2 * T, HEADS, hd], np.int64),
        "starts": np.array(starts, np.int64),
        "ends": np.array(ends, np.int64),
        "axes": np.array([slice_axis], np.int64),
        "shape3": np.array([-1, half, 2 * T * hd], np.int64),
    }
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(proto)
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def _reference(u: np.ndarray, c: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The mixing in numpy, written out: heads HEADS/2.. of both sides' tokens, head-major."""
    x = np.concatenate([u[idx], c], axis=1).reshape(len(idx), 2 * T, HEADS, D // HEADS)
    x = x[:, :, HEADS // 2 :, :].transpose(0, 2, 1, 3)
    return x.reshape(len(idx), HEADS // 2, -1)


def _run(proto: onnx.ModelProto, **feeds: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _feeds() -> dict[str, np.ndarray]:
    return {
        "u": RNG.normal(size=(M, T, D)).astype(np.float32),
        "c": RNG.normal(size=(N, T, D)).astype(np.float32),
        "idx": np.array([2, 0, 0, 1, 2, 2, 1], np.int64),
    }


def test_mixing_chain_runs_per_part_with_the_user_part_before_its_gather():
    original = _mixing_graph()
    model = ir.serde.deserialize_model(original)
    result = optimize_inference(model)
    assert result.modified
    made = [n for n in result.model.graph if n.metadata_props.get(PASS_KEY) == PASS]
    assert [n.op_type for n in made].count("Transpose") == 2  # one per part
    gather = next(n for n in result.model.graph if n.op_type == "Gather")
    assert gather.inputs[0].producer().op_type == "Transpose"  # the user part is gathered last
    cat = next(n for n in result.model.graph if n.op_type == "Concat")
    assert cat.attributes["axis"].value == 2  # the concat axis followed the transpose
    assert "Slice" not in [n.op_type for n in result.model.graph if n.metadata_props.get(PASS_KEY) != PASS]
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = _feeds()
    got = _run(proto, **feeds)
    np.testing.assert_array_equal(got, _reference(**feeds))  # copies only: bit-exact
    np.testing.assert_array_equal(got, _run(original, **feeds))


def test_slice_on_the_concat_axis_is_left_alone():
    original = _mixing_graph(slice_axis=1)
    result = HoistGatheredConcatPass()(ir.serde.deserialize_model(original))
    assert not result.modified


def test_transpose_moving_the_row_axis_is_left_alone():
    # perm moves axis 0: Slice alone would still distribute, but a chain of only a Slice
    # (no Transpose) is hoisted too; what must not happen is pushing the row-moving Transpose
    original = _mixing_graph(perm="1, 0, 2, 3")
    result = HoistGatheredConcatPass()(ir.serde.deserialize_model(original))
    transposes = [n for n in result.model.graph if n.op_type == "Transpose"]
    assert len(transposes) == 1 and PASS_KEY not in transposes[0].metadata_props
    feeds = _feeds()
    got = _run(ir.serde.serialize_model(result.model), **feeds)
    np.testing.assert_array_equal(got, _run(original, **feeds))


def test_chain_value_used_twice_is_left_alone():
    original = _mixing_graph(extra_use=True)
    result = HoistGatheredConcatPass()(ir.serde.deserialize_model(original))
    assert not result.modified


@pytest.mark.parametrize("users", [1, M])
def test_hoisted_graph_matches_numpy_for_any_user_index(users):
    proto = ir.serde.serialize_model(optimize_inference(ir.serde.deserialize_model(_mixing_graph())).model)
    feeds = _feeds()
    feeds["u"] = feeds["u"][:users]
    feeds["idx"] = RNG.integers(0, users, size=N).astype(np.int64)
    np.testing.assert_array_equal(_run(proto, **feeds), _reference(**feeds))
