"""Backend lowering of the standard ``DequantizeLinear -> MatMul`` form.

    LowerToMatMulNBitsPass   ONNX Runtime CPU: MatMul(A, DQ(Wq, s)) [+ Add(bias)]
                             -> com.microsoft.MatMulNBits(A, B_packed, scales[, bias])
    Fp16ActivationsPass      GPU (TensorRT, W8A16 proper): DQ emits fp16 weights and the
                             MatMul runs on fp16 activations: Cast(A->fp16), MatMul, Cast(->fp32)

MatMulNBits layout (as onnxruntime.quantization.matmul_nbits_quantizer packs it):
B is uint8 [N, k_blocks, blob_size] with the K axis blocked per output column, values stored
unsigned as q + 2^(bits-1) (the default zero point when none is given), 4-bit values two per
byte, low nibble first; scales are [N, k_blocks]. A per-channel scale becomes the same scale
repeated for every block of its column, which dequantizes to exactly the same weights.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graph_passes.onnx._util import (
    Refusal,
    add_initializer,
    const_array,
    node_name,
    require_opset,
    tag,
)
from graph_passes.onnx.quantize import QuantizedWeight

log = logging.getLogger(__name__)
MS_DOMAIN = "com.microsoft"


def pack_matmul_nbits(qw: QuantizedWeight, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(B uint8 [N, k_blocks, blob], scales float32 [N, k_blocks]) for MatMulNBits."""
    k, n = qw.q.shape
    nb = -(-k // block_size)
    if qw.block_size is None:
        scales = np.repeat(qw.scale[:, None], nb, axis=1)
    elif qw.block_size == block_size:
        scales = np.ascontiguousarray(qw.scale.T)
    else:
        raise ValueError(
            f"weight is block-wise with {qw.block_size}, asked to pack as {block_size}"
        )
    zero = 1 << (qw.bits - 1)
    u = np.full((nb * block_size, n), zero, dtype=np.uint8)  # padding rows dequantize to 0
    u[:k] = (qw.q.astype(np.int16) + zero).astype(np.uint8)
    blocks = u.T.reshape(n, nb, block_size)
    if qw.bits == 4:
        blocks = (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(blocks), scales.astype(np.float32)


def _dq_weight(value: ir.Value) -> tuple[ir.Node, QuantizedWeight] | str:
    """The quantized weight behind ``value`` if it is our DequantizeLinear form, else a reason."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return "weight is not produced by DequantizeLinear"
    if len(dq.inputs) > 2 and dq.inputs[2] is not None:
        return "DequantizeLinear has a zero point (only symmetric weights are lowered)"
    q, s = const_array(dq.inputs[0]), const_array(dq.inputs[1])
    if q is None or s is None:
        return "quantized weight or scale is not a constant"
    if q.ndim != 2:
        return f"quantized weight has rank {q.ndim}, expected 2"
    bits = 4 if dq.inputs[0].dtype == ir.DataType.INT4 else 8
    if dq.inputs[0].dtype not in (ir.DataType.INT8, ir.DataType.INT4):
        return f"quantized weight dtype {dq.inputs[0].dtype} is not int8/int4"
    attrs = {k: v.value for k, v in dq.attributes.items()}
    block = attrs.get("block_size", 0) or None
    axis = attrs.get("axis", 1)
    if block is None and not (axis in (1, -1) and s.ndim == 1):
        return f"DequantizeLinear axis={axis} is not per output channel"
    if block is not None and axis != 0:
        return f"block-wise DequantizeLinear along axis {axis}, expected 0 (K)"
    return dq, QuantizedWeight(q.astype(np.int8), s.astype(np.float32), bits, block)


class LowerToMatMulNBitsPass(ir.passes.InPlacePass):
    """Rewrite ``MatMul(A, DequantizeLinear(Wq, s))`` to ORT's fused ``MatMulNBits``.

    Args:
        accuracy_level: MatMulNBits' compute type for A: 0 = unset (fp32), 4 = A quantized
            to int8 per block (the fast CPU path; adds activation rounding, so budgets are
            measured on the lowered graph). Measured on a per-token FFN (4 blocks, T=8,
            128->512->128, int8, ORT 1.32, 2 threads, vs fp32): level 4 0.55x at batch 1 and
            0.90-1.02x at 512; level 0 3.0-3.3x at batch 1 (it dequantizes B every call) and
            0.74-0.86x at 512. Level 4 is the default: only it gains at the user side's M=1.
        block_size: blocking used for per-channel weights (block-wise weights keep theirs).
            Same measurement: 128 beats 32 (1.04-1.10x slower) and 256 (1.12x slower).
        fuse_bias: fold a following ``Add`` of a constant [N] bias into MatMulNBits' bias input.
    """

    def __init__(
        self, accuracy_level: int = 4, block_size: int = 128, fuse_bias: bool = True
    ) -> None:
        super().__init__()
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(
                f"MatMulNBits block_size must be a power of two >= 16, got {block_size}"
            )
        self.accuracy_level, self.block_size, self.fuse_bias = accuracy_level, block_size, fuse_bias
        self.refusals: list[Refusal] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.refusals = []
        modified = False
        for node in list(model.graph):
            if node.op_type == "MatMul" and node.domain == "":
                reason = self._try_lower(model.graph, node)
                if reason is None:
                    modified = True
                elif reason != "weight is not produced by DequantizeLinear":
                    self.refusals.append(Refusal(node_name(node), node.op_type, reason))
                    log.info("LowerToMatMulNBitsPass: left %s alone: %s", node_name(node), reason)
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            _remove_dead_dq(model.graph)
        return ir.passes.PassResult(model, modified)

    def _try_lower(self, graph: ir.Graph, node: ir.Node) -> str | None:
        a = node.inputs[0]
        if a.dtype not in (ir.DataType.FLOAT, None):
            return f"activation '{a.name}' is {a.dtype}, MatMulNBits here expects float32"
        found = _dq_weight(node.inputs[1])
        if isinstance(found, str):
            return found
        _, qw = found
        # per-channel scales are repeated per block: one block spanning K (up to block_size)
        # keeps the scale bytes at 4/bs per weight (bs >= 64 keeps int8+scales <= 0.27x fp32)
        bs = qw.block_size or min(self.block_size, max(16, 1 << (qw.q.shape[0] - 1).bit_length()))
        if bs < 16:
            return f"block size {bs} < 16 is not supported by MatMulNBits"
        packed, scales = pack_matmul_nbits(qw, bs)
        k, n = qw.q.shape
        base = node.name or node.outputs[0].name
        inputs = [
            a,
            add_initializer(graph, f"{base}_nbits_B", packed),
            add_initializer(graph, f"{base}_nbits_scales", scales),
        ]
        old, out = [node], node.outputs[0]
        bias_add = self._bias_add(node, n) if self.fuse_bias else None
        if bias_add is not None:
            add, bias = bias_add
            inputs += [None, None, add_initializer(graph, f"{base}_nbits_bias", bias)]
            old, out = [node, add], add.outputs[0]
        attrs = [
            ir.AttrInt64("K", k),
            ir.AttrInt64("N", n),
            ir.AttrInt64("bits", qw.bits),
            ir.AttrInt64("block_size", bs),
        ]
        if self.accuracy_level:
            attrs.append(ir.AttrInt64("accuracy_level", self.accuracy_level))
        fused = ir.Node(MS_DOMAIN, "MatMulNBits", inputs, attributes=attrs, name=f"{base}_nbits")
        tag(fused, self.__class__.__name__, weight=node.metadata_props.get("ugsep.weight", ""))
        ir.convenience.replace_nodes_and_values(
            graph, node, old, [fused], [out], [fused.outputs[0]]
        )
        return None

    @staticmethod
    def _bias_add(node: ir.Node, n: int) -> tuple[ir.Node, np.ndarray] | None:
        out = node.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output():
            return None
        add = uses[0].node
        if add.op_type != "Add" or add.domain != "":
            return None
        other = add.inputs[1 - uses[0].idx]
        bias = const_array(other)
        if bias is None or bias.dtype != np.float32 or bias.size != n or bias.shape[-1:] != (n,):
            return None
        return add, bias.reshape(n)


def _remove_dead_dq(graph: ir.Graph) -> None:
    for node in list(graph):
        if node.op_type == "DequantizeLinear" and not any(
            o.uses() or o.is_graph_output() for o in node.outputs
        ):
            graph.remove(node, safe=True)


class Fp16ActivationsPass(ir.passes.InPlacePass):
    """W8A16 for GPU backends: quantized MatMuls compute in fp16, the graph's I/O stays fp32.

    Each ``MatMul(A, DequantizeLinear(Wq, s))`` becomes
    ``Cast(MatMul(Cast(A, fp16), DequantizeLinear(Wq, fp16 s)), fp32)``: the weight is read as
    int8 and dequantized straight to fp16 (what TensorRT fuses into its weight-only kernels);
    no int64 or shape ops are introduced.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[Refusal] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.refusals = []
        converted: dict[ir.Node, ir.Value] = {}
        modified = False
        for node in list(model.graph):
            if node.op_type != "MatMul" or node.domain != "":
                continue
            found = _dq_weight(node.inputs[1])
            if isinstance(found, str):
                continue
            if node.inputs[0].dtype not in (ir.DataType.FLOAT, None):
                self.refusals.append(
                    Refusal(node_name(node), "MatMul", f"activation is {node.inputs[0].dtype}")
                )
                continue
            require_opset(model, 19, "DequantizeLinear with fp16 scales")
            self._convert(model.graph, node, found[0], converted)
            modified = True
        if modified:
            _remove_dead_dq(model.graph)
        return ir.passes.PassResult(model, modified)

    def _convert(self, graph: ir.Graph, node: ir.Node, dq: ir.Node, converted: dict) -> None:
        name = self.__class__.__name__
        if dq not in converted:
            s16 = add_initializer(
                graph, f"{dq.inputs[1].name}_fp16", const_array(dq.inputs[1]).astype(np.float16)
            )
            dq16 = tag(
                ir.Node(
                    "",
                    "DequantizeLinear",
                    [dq.inputs[0], s16],
                    attributes=list(dq.attributes.values()),
                    name=f"{dq.name}_fp16",
                ),
                name,
            )
            graph.insert_before(node, dq16)
            converted[dq] = dq16.outputs[0]
        fp16, fp32 = ir.AttrInt64("to", ir.DataType.FLOAT16), ir.AttrInt64("to", ir.DataType.FLOAT)
        a16 = tag(
            ir.Node("", "Cast", [node.inputs[0]], attributes=[fp16], name=f"{node.name}_a16"), name
        )
        mm = tag(
            ir.Node("", "MatMul", [a16.outputs[0], converted[dq]], name=f"{node.name}_fp16"), name
        )
        back = tag(
            ir.Node("", "Cast", [mm.outputs[0]], attributes=[fp32], name=f"{node.name}_fp32"), name
        )
        for k, v in node.metadata_props.items():
            mm.metadata_props.setdefault(k, v)
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [a16, mm, back], [node.outputs[0]], [back.outputs[0]]
        )
