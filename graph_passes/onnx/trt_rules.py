"""Op-specific TensorRT restrictions (onnx-tensorrt docs/operators.md "Restrictions" column,
and TensorRT's Quantize/Dequantize layer constraints), one rule per op: node -> findings.

Dequantize/Quantize (https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/Quantize.html):
the scale is a build-time constant (float32/float16/bfloat16): a scalar for per-tensor, 1-D for
per-channel, same rank as the input for blocked; the zero point, if any, is all zeros; INT4 is
weight-only, and activations are quantized per-tensor.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from graph_passes.onnx import trt_ops
from graph_passes.onnx.trt_findings import ERROR, Finding, const, finding, is_const


def _dequantize(node: ir.Node) -> list[Finding]:
    """(De)QuantizeLinear: constant float scale, zero zero point, granularity vs constness."""
    problems = _scale_problems(node) + _zero_point_problems(node) + _granularity_problems(node)
    return [finding(node, ERROR, "quantize", msg, fix) for msg, fix in problems]


def _scale_problems(node: ir.Node) -> list[tuple[str, str]]:
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    out = []
    if scale is not None and not is_const(scale):
        out.append(
            ("the scale must be a build-time constant", "fold the scale into an initializer")
        )
    if scale is not None and scale.dtype is not None and scale.dtype.name not in _SCALE_DTYPES:
        out.append(
            (
                f"scale dtype {scale.dtype.name} is not float32/float16/bfloat16",
                "store scales as float32 or float16",
            )
        )
    return out


def _zero_point_problems(node: ir.Node) -> list[tuple[str, str]]:
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if zp is None:
        return []
    zval = const(zp)
    if zval is not None and not np.any(zval.astype(np.float64) != 0):
        return []
    return [
        (
            "the zero point must be all zeros (TensorRT quantization is symmetric)",
            "quantize symmetrically (QuantizeWeightsInt8Pass does) or drop the zero-point input",
        )
    ]


def _granularity_problems(node: ir.Node) -> list[tuple[str, str]]:
    x = node.inputs[0]
    granularity = _granularity(node, node.inputs[1] if len(node.inputs) > 1 else None)
    out = []
    if granularity != "per-tensor" and not is_const(x):
        out.append(
            (
                f"{granularity} quantization of a non-constant tensor; TensorRT supports it "
                "only for weights (activations are per-tensor)",
                "quantize activations per-tensor, or only quantize weights",
            )
        )
    if granularity == "blocked" and x.shape is not None and len(x.shape) != 2:
        out.append(
            (
                f"blocked quantization of a rank-{len(x.shape)} weight; TensorRT supports "
                "2-D weights",
                "quantize the 2-D MatMul weight, before any reshape",
            )
        )
    if node.op_type == "DequantizeLinear" and x.dtype == ir.DataType.INT4 and not is_const(x):
        out.append(("INT4 is weight-only in TensorRT", "only dequantize constant INT4 weights"))
    return out


_SCALE_DTYPES = ("FLOAT", "FLOAT16", "BFLOAT16")


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
            finding(
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
            finding(
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
        finding(
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
        finding(
            node, ERROR, "attribute", f"Constant uses {bad}", trt_ops.OPS["Constant"].restrictions
        )
    ]


def _chain(*rules):
    return lambda node: [f for r in rules for f in r(node)]


OP_RULES = {
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
