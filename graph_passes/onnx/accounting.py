"""Weight-bytes accounting of linear layers: what quantization saved, per graph."""

from __future__ import annotations

import numpy as np
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
    constant, MatMulNBits, and the sparse MoE gather form's expert tables (a constant
    ``[T*E, K, N]`` table gathered into a MatMul's weight input, fp32 or int8 + Cast with its
    gathered per-expert scales; graph_passes.onnx.moe / moe_quant), one layer per table, and the
    fused form's com.microsoft.MoE / QMoE weights (two layers a bank). Returns ``{"layers", "quantized_layers", "fp32", "quantized",
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
        for fp32, now in _fused_moe_bytes(node) or [_layer_bytes(node)]:
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


def _fused_moe_bytes(node: ir.Node) -> list[tuple[int, int]] | None:
    """A fused-form bank (com.microsoft.MoE, or QMoE after W8A16): its two weights as two
    layers, (fp32 bytes, bytes stored now) each; None for any other node."""
    if node.domain != "com.microsoft" or node.op_type not in ("MoE", "QMoE"):
        return None
    if node.op_type == "MoE":  # x, router, W1, b1, W2, b2
        ws = [const_array(node.inputs[i]) for i in (2, 4)]
        return [(w.size * _FLOAT_BYTES, int(w.nbytes)) for w in ws if w is not None]
    out = []  # x, router, W1q, s1, b1, W2q, s2, b2: uint8 one byte per weight
    for wi, si in ((2, 3), (5, 6)):
        q = const_array(node.inputs[wi])
        if q is not None:
            out.append((q.size * _FLOAT_BYTES, int(q.nbytes) + _nbytes(node.inputs[si])))
    return out


def _layer_bytes(node: ir.Node) -> tuple[int | None, int]:
    if node.domain == "" and node.op_type == "Gather":
        return _expert_table_bytes(node)
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


def _weight_input_of_matmul(value: ir.Value, through_cast: bool) -> ir.Node | None:
    """The MatMul that takes ``value`` (or its Cast, if ``through_cast``) as its weight input."""
    for use in value.uses():
        node = use.node
        if node.domain != "":
            continue
        if node.op_type == "MatMul" and use.idx == 1 and not through_cast:
            return node
        if through_cast and node.op_type == "Cast":
            found = _weight_input_of_matmul(node.outputs[0], False)
            if found is not None:
                return found
    return None


def _expert_table_bytes(gather: ir.Node) -> tuple[int | None, int]:
    """A gather-form expert table: (fp32 bytes, bytes stored now) or (None, 0)."""
    table = const_array(gather.inputs[0])
    if table is None or table.ndim != 3:
        return None, 0
    if table.dtype == np.float32:
        if _weight_input_of_matmul(gather.outputs[0], False) is None:
            return None, 0
        return table.size * _FLOAT_BYTES, int(table.nbytes)
    if table.dtype != np.int8:
        return None, 0
    matmul = _weight_input_of_matmul(gather.outputs[0], True)
    if matmul is None:
        return None, 0
    scale = 0  # the per-(expert, channel) scales, gathered by the same ids into the Mul after it
    for use in matmul.outputs[0].uses():
        if use.node.op_type == "Mul":
            other = use.node.inputs[1 - use.idx]
            src = other.producer() if other is not None else None
            if src is not None and src.op_type == "Gather" and src.inputs[1] is gather.inputs[1]:
                scale += _nbytes(src.inputs[0])
    return table.size * _FLOAT_BYTES, int(table.nbytes) + scale
