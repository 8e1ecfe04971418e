"""runtime.onnx_wire against the onnx package's own parser, on random models (hypothesis).

Models are built and serialized with ``onnx.helper`` (the reference writer) and read back
both by ``onnx.load`` and by the wire reader; every field the bundle checks use must agree.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from runtime.errors import BundleError
from runtime.onnx_wire import ELEM_TYPES, read_graph

NAMES = st.text(alphabet="abcxyz_.é0123456789", min_size=1, max_size=12)
DIM = st.one_of(st.integers(0, 2**40), st.sampled_from(["batch", "N", "M", "s23"]), st.none())
TYPES = st.sampled_from(sorted(ELEM_TYPES))


def _value_info(name, elem, dims):
    if dims is None:
        return helper.make_tensor_value_info(name, elem, None)
    vi = helper.make_tensor_value_info(name, elem, [d if d is not None else "" for d in dims])
    for d, proto in zip(dims, vi.type.tensor_type.shape.dim, strict=True):
        if d is None:
            proto.Clear()  # a dim with neither value nor param
    return vi


@st.composite
def models(draw):
    names = draw(st.lists(NAMES, min_size=2, max_size=8, unique=True))
    ios = [(n, draw(TYPES), draw(st.none() | st.lists(DIM, max_size=4))) for n in names]
    k = draw(st.integers(1, len(ios) - 1))
    inits = []
    for i in range(draw(st.integers(0, 3))):
        dims = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
        values = np.asarray(draw(st.lists(st.integers(-2**62, 2**62), min_size=int(np.prod(dims)),
                                          max_size=int(np.prod(dims)))), np.int64).reshape(dims)
        inits.append(numpy_helper.from_array(values, f"init{i}"))
    nodes = []
    for i in range(draw(st.integers(0, 5))):
        attrs = {"axis": draw(st.integers(-3, 3))} if draw(st.booleans()) else {}
        nodes.append(helper.make_node(draw(st.sampled_from(["Gather", "Add", "Cast", "Custom"])),
                                      draw(st.lists(NAMES, max_size=3)), [f"out{i}"],
                                      domain=draw(st.sampled_from(["", "com.microsoft"])), **attrs))
    graph = helper.make_graph(nodes, "g", [_value_info(*io) for io in ios[:k]],
                              [_value_info(*io) for io in ios[k:]], inits)
    return helper.make_model(graph)


def _reference(v):
    t = v.type.tensor_type
    dims = None
    if t.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param")
                else None for d in t.shape.dim]
    return v.name, ELEM_TYPES.get(t.elem_type) if t.elem_type else None, dims


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=models())
def test_the_wire_reader_agrees_with_onnx(tmp_path, model):
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    ref = onnx.load(str(path)).graph
    got = read_graph(path)
    assert [(v.name, v.dtype, v.dims) for v in got.inputs] == [_reference(v) for v in ref.input]
    assert [(v.name, v.dtype, v.dims) for v in got.outputs] == [_reference(v) for v in ref.output]
    assert [(n.op_type, n.domain, n.inputs, n.outputs, n.ints) for n in got.nodes] == [
        (n.op_type, n.domain, list(n.input), list(n.output), {a.name: a.i for a in n.attribute})
        for n in ref.node
    ]
    assert {k: (t.dims, t.int_values()) for k, t in got.initializers.items()} == {
        t.name: (list(t.dims), numpy_helper.to_array(t).ravel().tolist()) for t in ref.initializer
    }


def test_large_weights_are_skipped_not_copied(tmp_path):
    table = numpy_helper.from_array(np.ones((300_000, 8), np.float32), "table")  # 9.6 MB
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 8])], [table])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "m.onnx"))
    g = read_graph(tmp_path / "m.onnx")
    assert g.initializers["table"].dims == [300_000, 8] and g.initializers["table"].raw is None


def test_a_truncated_file_is_a_bundle_error(tmp_path):
    data = helper.make_model(helper.make_graph(
        [], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])).SerializeToString()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="is not a readable ONNX model"):
        read_graph(tmp_path / "t.onnx")
