"""The TensorRT readiness check on real torch.onnx (dynamo) graphs and small planted ONNX graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.parser
import pytest
import torch

from graph_passes.onnx import trt_ops
from graph_passes.onnx.trt_support import (
    check_trt_readiness,
    format_report,
    has_errors,
    producing_code,
)

torch.set_num_threads(1)


def _export(module: torch.nn.Module, *args, dynamic: bool = True) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = tuple({0: batch} for _ in args) if dynamic else None
    prog = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=shapes, verbose=False)
    return prog.model_proto


class Ranker(torch.nn.Module):
    """Embedding gather, layer_norm, self-attention (bmm + softmax), einsum, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.att = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, ids, dense):
        x = self.ln(self.emb(ids) + dense.unsqueeze(1))
        y, _ = self.att(x, x, x, need_weights=False)
        scores = torch.bmm(y, x.transpose(1, 2)).softmax(-1)
        pooled = torch.einsum("blm,bmd->bd", scores, y)
        return torch.sigmoid(self.head(pooled)).squeeze(-1)


@pytest.fixture(scope="module")
def ranker_onnx() -> onnx.ModelProto:
    torch.manual_seed(0)
    return _export(Ranker(), torch.randint(0, 50, (3, 6)), torch.randn(3, 16))


def test_torch_ranker_graph_is_ready(ranker_onnx):
    ops = {n.op_type for n in ranker_onnx.graph.node}
    # the graph really contains what we claim to check
    assert {"Gather", "LayerNormalization", "Softmax", "MatMul", "Einsum"} <= ops, ops
    findings = check_trt_readiness(ranker_onnx)
    assert findings == [], format_report(findings)
    assert not has_errors(findings)
    assert "ready for TensorRT (0 error(s)" in format_report(findings, title="ranker")


class Uniq(torch.nn.Module):
    def forward(self, x):
        return torch.unique(x).sum(0, keepdim=True) + x.sum()


def test_planted_unique_is_reported_with_model_code_and_fix():
    model = _export(Uniq(), torch.randn(2, 5), dynamic=False)
    findings = check_trt_readiness(model)
    unique = [f for f in findings if f.op_type == "Unique"]
    assert len(unique) == 1 and unique[0].severity == "error", findings
    f = unique[0]
    assert f.rule == "unsupported-op" and "marks it unsupported" in f.message
    assert "test_trt_support.py" in f.source and "torch.unique" in f.source  # the forward line
    assert "fix" in str(f) and f.fix
    report = format_report(findings, title="uniq.onnx")
    assert report.startswith("uniq.onnx: NOT ready for TensorRT (1 error(s)")
    assert has_errors(findings)


class Doubles(torch.nn.Module):
    def forward(self, x):
        return (x.double() * 2.0).sum(-1).float()


def test_float64_math_is_an_unsupported_dtype():
    findings = check_trt_readiness(_export(Doubles(), torch.randn(4, 3)))
    bad = {f.op_type for f in findings if f.rule == "dtype" and f.severity == "error"}
    assert {"Mul", "ReduceSum"} <= bad, findings
    mul = next(f for f in findings if f.op_type == "Mul")
    assert "DOUBLE" in mul.message and "float32" in mul.fix
    assert "x.double()" in mul.source


def _model(text: str, *inits: onnx.TensorProto) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    return model


def _t(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(array, name)


HEADER = '<ir_version: 10, opset_import: ["" : 21{extra}]>\n'


def test_com_microsoft_op_is_reported_with_the_lowering_fix():
    m = _model(
        HEADER.format(extra=', "com.microsoft" : 1')
        + """
        g (float[N, 8] x) => (float[N, 8] y) { y = com.microsoft.Gelu(x) }"""
    )
    (f,) = check_trt_readiness(m)
    assert (f.severity, f.rule, f.op_type) == ("error", "custom-domain", "Gelu")
    assert "com.microsoft::Gelu" in f.message and "--target trt" in f.fix


def test_string_tensor_and_unknown_op_are_errors():
    m = onnx.helper.make_model(
        oh.make_graph(
            [
                oh.make_node("Identity", ["s"], ["t"], name="ident"),
                oh.make_node("Frobnicate", ["x"], ["y"], name="frob"),
            ],
            "g",
            [
                oh.make_tensor_value_info("s", onnx.TensorProto.STRING, ["N"]),
                oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2]),
            ],
            [
                oh.make_tensor_value_info("t", onnx.TensorProto.STRING, ["N"]),
                oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2]),
            ],
        ),
        opset_imports=[oh.make_opsetid("", 21)],
    )
    findings = check_trt_readiness(m)
    assert any(f.rule == "dtype" and "STRING" in f.message and f.node == "ident" for f in findings)
    assert any(
        f.rule == "unsupported-op" and f.op_type == "Frobnicate" and "does not list it" in f.message
        for f in findings
    )


W8 = np.arange(12, dtype=np.int8).reshape(4, 3)


def _weights_model(scale, zp=None, attrs=""):
    """DequantizeLinear on a constant int8 weight (the W8A16 form)."""
    m = onnx.parser.parse_model(
        HEADER.format(extra="")
        + f"""
        g (float[N, 4] a) => (float[N, 3] y) {{
            w = DequantizeLinear{attrs}(wq, s{", zp" if zp is not None else ""})
            y = MatMul(a, w)
        }}"""
    )
    m.graph.initializer.extend(
        [_t("wq", W8), _t("s", scale)] + ([_t("zp", zp)] if zp is not None else [])
    )
    onnx.checker.check_model(m)
    return m


def test_symmetric_per_channel_and_blocked_weight_dequantize_are_ready():
    assert check_trt_readiness(_weights_model(np.full(3, 0.1, np.float32), attrs="<axis=1>")) == []
    assert check_trt_readiness(_weights_model(np.float32(0.1))) == []
    blocked = _weights_model(np.full((2, 3), 0.1, np.float32), attrs="<axis=0, block_size=2>")
    assert check_trt_readiness(blocked) == []


def test_dequantize_with_nonzero_zero_point_is_refused():
    m = _weights_model(
        np.full(3, 0.1, np.float32), zp=np.array([0, 3, 0], np.int8), attrs="<axis=1>"
    )
    (f,) = check_trt_readiness(m)
    assert f.op_type == "DequantizeLinear" and "zero point must be all zeros" in f.message


def test_per_channel_dequantize_of_an_activation_is_refused():
    m = _model(
        HEADER.format(extra="")
        + """
        g (int8[N, 4] xq, float[4, 3] b) => (float[N, 3] y) {
            x = DequantizeLinear<axis=1>(xq, s)
            y = MatMul(x, b)
        }""",
        _t("s", np.full(4, 0.1, np.float32)),
    )
    (f,) = check_trt_readiness(m)
    assert "per-channel quantization of a non-constant tensor" in f.message


def test_uint8_dequantize_is_an_unsupported_dtype():
    m = onnx.parser.parse_model(
        HEADER.format(extra="")
        + """
        g (float[N, 4] a) => (float[N, 3] y) { w = DequantizeLinear(wq, s)  y = MatMul(a, w) }"""
    )
    m.graph.initializer.extend([_t("wq", W8.astype(np.uint8)), _t("s", np.float32(0.1))])
    (f,) = check_trt_readiness(m)
    assert f.rule == "dtype" and "DequantizeLinear on UINT8" in f.message


def test_reduce_axes_from_a_tensor_and_dynamic_feature_dims_are_errors():
    m = _model(
        HEADER.format(extra="")
        + """
        g (float[N, L] x, int64[1] axes) => (float[N] y) { y = ReduceSum<keepdims=0>(x, axes) }"""
    )
    findings = check_trt_readiness(m)
    rules = {(f.rule, f.node) for f in findings}
    assert ("dynamic-shape", "x") in rules  # L: only the batch dim gets a profile
    assert any(f.rule == "constant-input" and "`axes`" in f.message for f in findings)


def test_layer_norm_extra_outputs_and_opset_range():
    m = _model(
        HEADER.format(extra="")
        + """
        g (float[N, 4] x, float[4] g1, float[4] b1) => (float[N, 4] y, float[N, 1] mean) {
            y, mean = LayerNormalization<axis=-1>(x, g1, b1)
        }"""
    )
    (f,) = check_trt_readiness(m)
    assert f.rule == "attribute" and "mean" in f.message
    old = _model(
        '<ir_version: 7, opset_import: ["" : 8]>\n'
        "g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }"
    )
    assert [f.rule for f in check_trt_readiness(old)] == ["opset"]


def test_support_table_is_consistent():
    assert not set(trt_ops.OPS) & trt_ops.UNSUPPORTED
    for op, row in trt_ops.OPS.items():
        assert row.types and row.types <= trt_ops.KNOWN_DTYPES, op
    assert set(trt_ops.CONSTANT_INPUTS) <= set(trt_ops.OPS)
    assert "INT64" in trt_ops.OPS["Gather"].types and "INT64" not in trt_ops.OPS["MatMul"].types
    assert trt_ops.OPS["DequantizeLinear"].types == {"INT8", "INT4", "FLOAT8E4M3FN", "FLOAT4E2M1"}


def test_producing_code_reads_torch_metadata(ranker_onnx):
    import onnx_ir as ir

    model = ir.from_proto(ranker_onnx)
    ln = next(n for n in model.graph if n.op_type == "LayerNormalization")
    src = producing_code(ln)
    assert src.startswith("module ln ") and "test_trt_support.py" in src and "self.ln(" in src
