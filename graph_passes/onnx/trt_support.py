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

import ast
import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes.onnx import trt_ops

log = logging.getLogger(__name__)

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    """One reason TensorRT would refuse (error) or silently alter (warning) a graph."""

    severity: str
    rule: str
    node: str
    op_type: str
    message: str
    fix: str = ""
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.op_type} '{self.node}'" if self.op_type else self.node
        text = f"[{self.severity}] {self.rule}: {where}: {self.message}"
        if self.source:
            text += f"\n    produced by: {self.source}"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


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
            _finding(
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
            _finding(
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
    rule = _OP_RULES.get(op)
    if rule is not None:
        findings += rule(node)
    return findings


def _check_dtypes(node: ir.Node) -> list[Finding]:
    out = []
    for v in [*node.inputs, *node.outputs]:
        if v is not None and v.dtype is not None and v.dtype.name not in trt_ops.KNOWN_DTYPES:
            out.append(
                _finding(
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
            _finding(
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
            and not _is_const(node.inputs[idx])
        ):
            out.append(
                _finding(
                    node,
                    ERROR,
                    "constant-input",
                    f"input `{what}` ('{node.inputs[idx].name}') must be a build-time constant",
                    f"compute `{what}` from Python constants, not from tensors",
                )
            )
    return out


# ---- op-specific rules -------------------------------------------------------------------


def _dequantize(node: ir.Node) -> list[Finding]:
    x, scale = node.inputs[0], node.inputs[1]
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    out = []
    if scale is not None and not _is_const(scale):
        out.append(
            _finding(
                node,
                ERROR,
                "quantize",
                "the scale must be a build-time constant",
                "fold the scale into an initializer",
            )
        )
    if (
        scale is not None
        and scale.dtype is not None
        and scale.dtype.name not in ("FLOAT", "FLOAT16", "BFLOAT16")
    ):
        out.append(
            _finding(
                node,
                ERROR,
                "quantize",
                f"scale dtype {scale.dtype.name} is not float32/float16/bfloat16",
                "store scales as float32 or float16",
            )
        )
    if zp is not None:
        zval = _const(zp)
        if zval is None or np.any(zval.astype(np.float64) != 0):
            out.append(
                _finding(
                    node,
                    ERROR,
                    "quantize",
                    "the zero point must be all zeros (TensorRT quantization is symmetric)",
                    "quantize symmetrically (QuantizeWeightsInt8Pass does) or drop "
                    "the zero-point input",
                )
            )
    granularity = _granularity(node, scale)
    if granularity != "per-tensor" and not _is_const(x):
        out.append(
            _finding(
                node,
                ERROR,
                "quantize",
                f"{granularity} quantization of a "
                "non-constant tensor; TensorRT supports it only for weights "
                "(activations are per-tensor)",
                "quantize activations per-tensor, or only quantize weights",
            )
        )
    if granularity == "blocked" and x.shape is not None and len(x.shape) != 2:
        out.append(
            _finding(
                node,
                ERROR,
                "quantize",
                f"blocked quantization of a rank-"
                f"{len(x.shape)} weight; TensorRT supports 2-D weights",
                "quantize the 2-D MatMul weight, before any reshape",
            )
        )
    if (
        node.op_type == "DequantizeLinear"
        and x.dtype is not None
        and x.dtype.name == "INT4"
        and not _is_const(x)
    ):
        out.append(
            _finding(
                node,
                ERROR,
                "quantize",
                "INT4 is weight-only in TensorRT",
                "only dequantize constant INT4 weights",
            )
        )
    return out


def _granularity(node: ir.Node, scale: ir.Value | None) -> str:
    block = node.attributes.get("block_size")
    if block is not None and block.as_int() > 0:
        return "blocked"
    dims = list(scale.shape) if scale is not None and scale.shape is not None else []
    if dims and not (all(isinstance(d, int) for d in dims) and math.prod(dims) == 1):
        return "per-channel"
    return "per-tensor"


def _unused_extra_outputs(name: str):
    def rule(node: ir.Node) -> list[Finding]:
        used = [
            o.name for o in node.outputs[1:] if o is not None and (o.uses() or o.is_graph_output())
        ]
        if not used:
            return []
        return [
            _finding(
                node,
                ERROR,
                "attribute",
                f"outputs {used} are used; TensorRT only supports {name}",
                "do not use the extra outputs in the model",
            )
        ]

    return rule


def _attr_equals(attr: str, allowed: object, default: object):
    def rule(node: ir.Node) -> list[Finding]:
        a = node.attributes.get(attr)
        value = default if a is None else a.value
        if value == allowed:
            return []
        return [
            _finding(
                node,
                ERROR,
                "attribute",
                f"attribute `{attr}`={value!r}; TensorRT requires {allowed!r}",
                trt_ops.OPS[node.op_type].restrictions,
            )
        ]

    return rule


def _dilations_ones(node: ir.Node) -> list[Finding]:
    a = node.attributes.get("dilations")
    if a is None or all(d == 1 for d in a.value):
        return []
    return [
        _finding(
            node,
            ERROR,
            "attribute",
            f"dilations {list(a.value)} are not all ones",
            trt_ops.OPS[node.op_type].restrictions,
        )
    ]


def _constant_value(node: ir.Node) -> list[Finding]:
    bad = [k for k in ("sparse_value", "value_string", "value_strings") if k in node.attributes]
    if not bad:
        return []
    return [
        _finding(
            node, ERROR, "attribute", f"Constant uses {bad}", trt_ops.OPS["Constant"].restrictions
        )
    ]


def _chain(*rules):
    return lambda node: [f for r in rules for f in r(node)]


_OP_RULES = {
    "DequantizeLinear": _dequantize,
    "QuantizeLinear": _dequantize,
    "LayerNormalization": _unused_extra_outputs("the first output Y"),
    "MaxPool": _chain(_unused_extra_outputs("the first output"), _dilations_ones),
    "AveragePool": _dilations_ones,
    "LpPool": _dilations_ones,
    "TopK": _attr_equals("sorted", 1, 1),
    "ScatterND": _attr_equals("reduction", "none", "none"),
    "Resize": _attr_equals("antialias", 0, 0),
    "LSTM": _chain(_attr_equals("input_forget", 0, 0), _attr_equals("layout", 0, 0)),
    "Constant": _constant_value,
}


# ---- helpers -----------------------------------------------------------------------------


def _finding(node: ir.Node, severity: str, rule: str, message: str, fix: str) -> Finding:
    name = node.name or (node.outputs[0].name if node.outputs else node.op_type)
    return Finding(severity, rule, name, node.op_type, message, fix, producing_code(node))


def producing_code(node: ir.Node) -> str:
    """Where a node came from: module path and user source line (torch.onnx metadata),
    or the ugsep pass that created it."""
    meta = node.metadata_props
    parts = []
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = [s for s in ast.literal_eval(scopes) if s]
        except (ValueError, SyntaxError):
            names = [scopes]
        # the last scope is the FX node itself; the ones before it are the module path
        module = ".".join(names[:-1]) or "<top-level forward>"
        parts.append(f"module {module} (op {names[-1] if names else '?'})")
    elif meta.get("namespace"):
        parts.append(meta["namespace"])
    frame = _user_frame(meta.get("pkg.torch.onnx.stack_trace", ""))
    if frame:
        parts.append(frame)
    if meta.get("ugsep.pass"):
        parts.append(f"created by ugsep pass {meta['ugsep.pass']}")
    return "; ".join(parts)


def _user_frame(stack: str) -> str:
    """The innermost frame of ``stack`` outside torch itself: 'file:line in fn: code'."""
    lines = stack.splitlines()
    frames = []
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("File "):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append((s, code))
    user = [f for f in frames if "/torch/" not in f[0]] or frames
    if not user:
        return ""
    head, code = user[-1]
    head = head.replace("File ", "", 1).replace('", line ', ":").replace('"', "")
    return f"{head}: {code}" if code else head


def _is_const(value: ir.Value | None) -> bool:
    return _const(value) is not None


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


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
