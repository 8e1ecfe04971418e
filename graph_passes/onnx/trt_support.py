"""TensorRT readiness: will TensorRT's ONNX parser and builder accept this graph? (CPU only)

    findings = check_trt_readiness(model)          # onnx.ModelProto or onnx_ir.Model
    print(format_report(findings, title="user.onnx"))
    has_errors(findings)                           # -> the build would fail

A pure analysis: no file I/O, no TensorRT import. Every node (including nodes inside
subgraphs and model-local functions) is checked against TensorRT's documented ONNX support
(``trt_ops``: the onnx-tensorrt ``docs/operators.md`` matrix for TensorRT 10.15 — op, opset
range, dtypes, restrictions) and against the constraints of TensorRT's quantization layers
(https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/Quantize.html and
.../Dequantize.html: scale a build-time constant; scalar scale per-tensor, 1-D per-channel,
same-rank blocked; zero point all zeros; per-channel/blocked only on constant weights,
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-with-quantized-types.html).
Dynamic shapes: ugsep builds one optimization profile over the batch dimension (dim 0) of
every input, so any other symbolic input dimension is an error.

Each finding names the node, the model code that produced it (from the
``pkg.torch.onnx.*`` / ``namespace`` metadata torch.onnx's dynamo exporter records, or the
``ugsep.pass`` tag of the pass that created it), and the fix.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

from graph_passes.onnx import trt_ops
from graph_passes.onnx.trt_findings import (
    ERROR,
    WARNING,
    Finding,
    finding,
    is_const,
    producing_code,
)
from graph_passes.onnx.trt_rules import OP_RULES

log = logging.getLogger(__name__)

__all__ = ["Finding", "check_trt_readiness", "format_report", "has_errors", "producing_code"]


def check_trt_readiness(model: onnx.ModelProto | ir.Model) -> list[Finding]:
    """Every reason TensorRT 10's ONNX parser/builder would reject ``model``, as Findings."""
    model = _typed_ir(model)
    findings = _check_opset(model) + _check_graph_io(model.graph)
    for node in _all_nodes(model):
        findings += _check_node(node)
    return findings


def has_errors(findings: list[Finding]) -> bool:
    """True when any finding would make the TensorRT build fail."""
    return any(f.severity == ERROR for f in findings)


def format_report(findings: list[Finding], *, title: str = "graph") -> str:
    """A readable report: a one-line verdict, then every finding with its source and fix."""
    errors = sum(f.severity == ERROR for f in findings)
    warnings = len(findings) - errors
    verdict = "ready for TensorRT" if not errors else "NOT ready for TensorRT"
    head = (
        f"{title}: {verdict} ({errors} error(s), {warnings} warning(s); "
        f"checked against {trt_ops.SOURCE})"
    )
    return "\n".join([head, *(str(f) for f in findings)])


# ---- model preparation -------------------------------------------------------------------


def _typed_ir(model: onnx.ModelProto | ir.Model) -> ir.Model:
    """An onnx_ir model with value types filled in by ONNX shape inference where possible."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:  # noqa: BLE001 - inference is best effort; types may already exist
        log.debug("shape inference failed (%s); checking with the recorded types", e)
    return ir.from_proto(proto)


def _all_nodes(model: ir.Model):
    """Nodes of the main graph, its subgraphs, and the bodies of the local functions used."""
    seen: set = set()
    stack = list(ir.traversal.RecursiveGraphIterator(model.graph))
    while stack:
        node = stack.pop(0)
        key = (node.domain, node.op_type, node.overload)
        fn = model.functions.get(key)
        if fn is not None:
            if key not in seen:
                seen.add(key)
                stack.extend(ir.traversal.RecursiveGraphIterator(fn))
            continue
        yield node


# ---- graph-level checks ------------------------------------------------------------------


def _check_opset(model: ir.Model) -> list[Finding]:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None or trt_ops.MIN_OPSET <= opset <= trt_ops.MAX_OPSET:
        return []
    return [
        Finding(
            ERROR,
            "opset",
            "<model>",
            "",
            f"default-domain opset {opset} is outside "
            f"TensorRT's supported range {trt_ops.MIN_OPSET}..{trt_ops.MAX_OPSET}",
            f"re-export with opset_version between {trt_ops.MIN_OPSET} and "
            f"{trt_ops.MAX_OPSET} (torch.onnx.export(..., opset_version=...))",
        )
    ]


def _check_graph_io(graph: ir.Graph) -> list[Finding]:
    out = []
    for value in graph.inputs:
        out += _check_input_shape(value)
    for value in [*graph.inputs, *graph.outputs]:
        dtype = value.dtype.name if value.dtype is not None else None
        if dtype is not None and dtype not in trt_ops.KNOWN_DTYPES:
            out.append(
                Finding(
                    ERROR,
                    "dtype",
                    value.name,
                    "",
                    f"graph input/output has dtype {dtype}, which TensorRT does not support",
                    "use float32/float16/int32/int64/bool tensors at the interface",
                )
            )
        elif dtype == "DOUBLE":
            out.append(
                Finding(
                    WARNING,
                    "dtype",
                    value.name,
                    "",
                    "graph input/output is DOUBLE;"
                    " TensorRT casts it to FLOAT, clamping to +-FLT_MAX",
                    "declare the tensor float32 in the model",
                )
            )
    return out


def _check_input_shape(value: ir.Value) -> list[Finding]:
    shape = value.shape
    if shape is None:
        return [
            Finding(
                ERROR,
                "dynamic-shape",
                value.name,
                "",
                "graph input has no known rank;"
                " TensorRT needs the rank to build an optimization profile",
                "export with fully specified input shapes (batch dim dynamic only)",
            )
        ]
    bad = [i for i, d in enumerate(shape) if i > 0 and not isinstance(d, int)]
    if not bad:
        return []
    return [
        Finding(
            ERROR,
            "dynamic-shape",
            value.name,
            "",
            f"input dims {bad} of shape "
            f"{list(shape)} are dynamic; ugsep's optimization profiles only cover "
            "the batch dim 0",
            "give every non-batch dimension a static size in the "
            "feature spec / dynamic_shapes (pad variable-length features)",
        )
    ]


# ---- node checks -------------------------------------------------------------------------


def _check_node(node: ir.Node) -> list[Finding]:
    if node.domain not in ("", "ai.onnx"):
        return [
            finding(
                node,
                ERROR,
                "custom-domain",
                f"op {node.domain}::{node.op_type} is "
                "not an ONNX standard op; TensorRT's parser has no importer for it",
                _domain_fix(node.domain),
            )
        ]
    op = node.op_type
    if op in trt_ops.UNSUPPORTED or op not in trt_ops.OPS:
        known = "marks it unsupported" if op in trt_ops.UNSUPPORTED else "does not list it"
        return [
            finding(
                node,
                ERROR,
                "unsupported-op",
                f"TensorRT's ONNX support matrix {known}",
                trt_ops.FIXES.get(
                    op,
                    "rewrite the model code with supported ops, or "
                    "provide a TensorRT plugin named after the op",
                ),
            )
        ]
    findings = _check_dtypes(node) + _check_constant_inputs(node)
    rule = OP_RULES.get(op)
    if rule is not None:
        findings += rule(node)
    return findings


def _check_dtypes(node: ir.Node) -> list[Finding]:
    out = []
    for v in [*node.inputs, *node.outputs]:
        if v is not None and v.dtype is not None and v.dtype.name not in trt_ops.KNOWN_DTYPES:
            out.append(
                finding(
                    node,
                    ERROR,
                    "dtype",
                    f"tensor '{v.name}' has dtype {v.dtype.name}, which TensorRT does not support",
                    "cast to a supported type in the model code (float32/float16/int32/int64/bool)",
                )
            )
    values = node.outputs if node.op_type in trt_ops.OUTPUT_TYPED else node.inputs
    data = values[0] if values else None
    if data is None or data.dtype is None or out:
        return out
    dtype, support = data.dtype.name, trt_ops.OPS[node.op_type]
    if dtype not in support.types:
        out.append(
            finding(
                node,
                ERROR,
                "dtype",
                f"{node.op_type} on {dtype} ('{data.name}') "
                f"is not supported; TensorRT supports it for "
                f"{', '.join(sorted(support.types))}",
                _dtype_fix(dtype),
            )
        )
    return out


def _check_constant_inputs(node: ir.Node) -> list[Finding]:
    out = []
    for idx, what in trt_ops.CONSTANT_INPUTS.get(node.op_type, {}).items():
        if (
            idx < len(node.inputs)
            and node.inputs[idx] is not None
            and not is_const(node.inputs[idx])
        ):
            out.append(
                finding(
                    node,
                    ERROR,
                    "constant-input",
                    f"input `{what}` ('{node.inputs[idx].name}') must be a build-time constant",
                    f"compute `{what}` from Python constants, not from tensors",
                )
            )
    return out


def _dtype_fix(dtype: str) -> str:
    if dtype == "DOUBLE":
        return "use float32 in the model (torch.float64 tensors/constants -> float32)"
    if dtype == "INT64":
        return (
            "TensorRT 10 has no INT64 kernel for this op: cast to int32 or float before it "
            "in the model code"
        )
    if dtype in trt_ops.QUANTIZED_DTYPES:
        return "quantized types only appear as DequantizeLinear inputs; dequantize first"
    return "cast to a dtype the op supports in the model code"


def _domain_fix(domain: str) -> str:
    if domain == "com.microsoft":
        return (
            "this is an ONNX Runtime contrib op (e.g. MatMulNBits from the ORT-CPU "
            "lowering); export the TensorRT bundle with --target trt so quantized weights "
            "stay as standard DequantizeLinear -> MatMul"
        )
    return "replace it with standard ONNX ops, or register a TensorRT plugin for it"
