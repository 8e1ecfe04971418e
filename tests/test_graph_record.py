"""The manifest describes the written graphs: precision per layer, boundary, threads.

The expected facts are read from the ONNX files here, by plain inspection of the nodes
(not with exporter.steps.graph_record), and compared with what the manifest says.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from exporter import pipeline
from exporter.load import LoadedModel
from exporter.steps.quantize import QuantizeOptions, QuantizeStepOptions, quantize_bundle_stages
from graph_passes.onnx import linear_layers
from runtime.manifest import BoundaryTensor
from runtime.spec import FeatureSpec
from tests.parity.conftest import SPLIT_SPEC, SplitToy


def _int_weights(model: onnx.ModelProto) -> set[str]:
    """Weights the graph runs quantized: MatMulNBits nodes and MatMuls fed by DequantizeLinear."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = set()
    for n in model.graph.node:
        meta = {p.key: p.value for p in n.metadata_props}
        if n.op_type == "MatMulNBits" or (n.op_type == "MatMul" and n.input[1] in dq):
            out.add(meta["ugsep.weight"].split(".t")[0])
    return out


def _two_layer_graph() -> onnx.ModelProto:
    """x[B, 8] @ W1[8, 64] @ W2[64, 64]: W1's reduction dim (8) is below the pass's min_k."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 64)).astype(np.float32), "w_small_k")
    w2 = numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "w_big")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_small_k"], ["h"]),
         helper.make_node("MatMul", ["h", "w_big"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 64])],
        [w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_selection_plans_with_the_passs_own_min_k_rule():
    """Before: linear_layers ignored min_k, so the layer table said int8 for a weight the
    pass refused (K=8 < 16) and left fp32."""
    import onnx_ir as ir

    model = _two_layer_graph()
    assert linear_layers(ir.serde.deserialize_model(model)) == ["w_big"]
    every = QuantizeOptions(min_elements=0, per_token_stages=("full",), tune=False)
    out, record = quantize_bundle_stages({"full": model}, None, options=every)
    assert _int_weights(out["full"]) == {"w_big"}
    rows = {r["name"]: r for r in record["layers"]}
    assert rows["full:w_small_k"]["precision"] == "fp32"
    assert "min_k" in rows["full:w_small_k"]["why"]
    assert rows["full:w_big"]["precision"] == "int8"


def _edit_plan(ctx) -> None:
    """A step between quantize/threads and write that makes the plan lie about the graphs."""
    for row in ctx.manifest_fields["quantization"].layers:
        row.precision = "fp32" if row.precision.startswith("int") else "int8"
    ctx.stage_meta.setdefault("user", {})["intra_op_threads"] = 7
    boundary = ctx.manifest_fields["split"].boundary
    boundary[0].dtype = "float16"
    boundary.append(BoundaryTensor(name="ghost", dtype="float32", shape=["M", 3], source="x"))


@pytest.mark.slow
def test_manifest_follows_the_written_graphs_not_an_edited_plan(tmp_path, monkeypatch):
    steps = list(pipeline.PIPELINE)
    at = [n for n, _ in steps].index("write")
    monkeypatch.setattr(pipeline, "PIPELINE", [*steps[:at], ("edit-plan", _edit_plan), *steps[at:]])
    loaded = LoadedModel(FeatureSpec.from_dict(SPLIT_SPEC), module=SplitToy().eval())
    options = pipeline.ExportOptions(
        precision="w8a16",
        parity=False,
        quantize=QuantizeStepOptions(min_elements=0, per_token_stages=("full", "user", "group")),
    )
    pipeline.export_bundle(loaded, tmp_path / "b", options)
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    graphs = {s: onnx.load(str(tmp_path / "b" / st["file"])) for s, st in m["stages"].items()}

    rows = m["quantization"]["layers"]
    for stage, g in graphs.items():
        ints = _int_weights(g)
        table = {r["name"].split(":", 1)[1].split(".t")[0]: r["precision"] for r in rows if r["stage"] == stage}
        assert {w for w, p in table.items() if p == "int8"} == ints, stage
    assert any(r["precision"] == "int8" for r in rows) and any(r["precision"] == "fp32" for r in rows)
    assert m["quantization"]["quantized_layers"] == sum(len(_int_weights(g)) for g in graphs.values())

    user_outputs = {o.name: o for o in graphs["user"].graph.output}
    assert [b["name"] for b in m["split"]["boundary"]] == list(user_outputs)
    for b in m["split"]["boundary"]:
        elem = user_outputs[b["name"]].type.tensor_type.elem_type
        assert b["dtype"] == onnx.helper.tensor_dtype_to_np_dtype(elem).name == "float32"

    for stage, g in graphs.items():
        stamped = {p.key: p.value for p in g.metadata_props}.get("ugsep.intra_op_threads")
        recorded = m["stages"][stage].get("intra_op_threads")
        assert recorded == (None if stamped is None else int(stamped)), stage
    assert m["stages"]["user"].get("intra_op_threads") != 7
