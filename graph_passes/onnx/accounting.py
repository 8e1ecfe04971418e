"""Weight-bytes accounting of linear layers: what quantization saved, per graph."""

from __future__ import annotations

import onnx_ir as ir

from graph_passes.onnx._util import const_array
from graph_passes.onnx.lower import _dq_weight

_FLOAT_BYTES = 4


def _nbytes(value: ir.Value) -> int:
    tensor = ir.convenience.get_const_tensor(value)
    return 0 if tensor is None else int(tensor.nbytes)


def linear_weight_bytes(model: ir.Model) -> dict[str, int]:
    """Bytes of the constant weights of every linear layer, as fp32 and as stored now.

    Linear layers are MatMul/Gemm with a constant weight, MatMul on a DequantizeLinear of a
    constant, and MatMulNBits. Returns ``{"layers", "quantized_layers", "fp32", "quantized",
    "quantized_layers_fp32", "quantized_layers_bytes"}``: ``fp32`` is what the layers'
    weights cost in float32, ``quantized`` what they cost in this graph (int payload + scales
    for quantized layers, float bytes for layers kept in float). The ratio of the last two
    keys is the compression of the quantized layers alone (int8 + scales: ≈ 0.25–0.27).
    """
    acc = dict.fromkeys(
        (
            "layers",
            "quantized_layers",
            "fp32",
            "quantized",
            "quantized_layers_fp32",
            "quantized_layers_bytes",
        ),
        0,
    )
    for node in model.graph.all_nodes():
        fp32, now = _layer_bytes(node)
        if fp32 is None:
            continue
        acc["layers"] += 1
        acc["fp32"] += fp32
        acc["quantized"] += now
        if now < fp32:
            acc["quantized_layers"] += 1
            acc["quantized_layers_fp32"] += fp32
            acc["quantized_layers_bytes"] += now
    return acc


def _layer_bytes(node: ir.Node) -> tuple[int | None, int]:
    if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
        k, n = node.attributes["K"].value, node.attributes["N"].value
        return k * n * _FLOAT_BYTES, _nbytes(node.inputs[1]) + _nbytes(node.inputs[2])
    if node.domain == "com.microsoft" and node.op_type == "DynamicQuantizeMatMul":  # w8a8.py
        q = const_array(node.inputs[1])
        return (None, 0) if q is None else (q.size * _FLOAT_BYTES, q.nbytes + _nbytes(node.inputs[2]))
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm"):
        return None, 0
    w = node.inputs[1]
    found = _dq_weight(w)
    if not isinstance(found, str):
        dq, qw = found
        return qw.q.size * _FLOAT_BYTES, _nbytes(dq.inputs[0]) + _nbytes(dq.inputs[1])
    arr = const_array(w)
    if arr is None or arr.ndim < 2:
        return None, 0
    return arr.size * _FLOAT_BYTES, int(arr.nbytes)
