"""W8A16 for sparse MoE expert tables in the gather form (graph_passes.onnx.moe).

    QuantizeExpertTablesPass(only, skip, bits)
        Gather(W[T*E, K, N], flat) -> MatMul(A, .)
    ->  Mul(MatMul(A, Cast(Gather(Wq[T*E, K, N] int8, flat))), Gather(scale[T*E, 1, N], flat))

    QuantizeFusedMoEPass(only, skip)
        com.microsoft.MoE(x, router, W1[T*E, H, D], b1, W2[T*E, D, H], b2)
    ->  com.microsoft.QMoE(x, router, W1q uint8, s1[T*E, H, D/bs], b1, W2q uint8, s2[T*E, D, H/bs], b2)

Symmetric int8 per expert and per output channel: one scale per (token, expert, output
column), so an expert's scale never depends on another expert's range. The scale is applied
after the MatMul (it is constant along the reduction axis K), on the [.., 1, N] output
instead of the gathered [.., K, N] weight; only int8 bytes are gathered. Expert banks in the
``grouped`` form are plain 2-D MatMuls (``<bank>.w1.t<t>.e<e>``) and go through
QuantizeWeightsInt8Pass like any linear layer; both count as one layer group per bank weight
for the accuracy-budgeted selection (exporter.steps.quantize.group_of). The ``fused`` form's
bank is ONE group (its two weights ``<bank>.fused_w1`` / ``.fused_w2`` fold to ``<bank>``):
QMoE takes both weights int8 or neither. Its weights are int8 per expert, output channel and
block of ``block_size`` (128; 0 when D or H is not a multiple of 16: per channel) along the
reduction axis, stored as uint8 q + 128 (QMoE's default zero point). Block-wise 8-bit runs
ONNX Runtime's QNBit GEMM (the MatMulNBits kernel), which quantizes the activations to int8
per block inside the kernel, as MatMulNBits at ``accuracy_level=4`` does for the other
layers; per channel it dequantizes each selected expert to float first. Measured on the bench
student's user graph at M=1 (2 threads, E=16, k=2): per channel 1.19 ms, block-wise 0.95 ms,
fp32 1.52 ms; max abs error on the user boundary 0.028 / 0.050.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from graph_passes.onnx._util import add_initializer, const_array, node_name, tag

__all__ = ["QuantizeExpertTablesPass", "QuantizeFusedMoEPass", "expert_tables", "fused_banks",
           "qmoe_block_size", "quantize_blocks", "quantize_table"]
MS_DOMAIN = "com.microsoft"
WEIGHTS_KEY = "ugsep.weights"  # on a QMoE: its float weights' names, comma separated
TABLE_KEY = "ugsep.moe_table"


def expert_tables(graph: ir.Graph) -> list[ir.Node]:
    """The gather-form weight Gathers (tagged by SparseMoEFormPass) with a float32 constant table."""
    out = []
    for node in graph:
        if node.op_type == "Gather" and TABLE_KEY in node.metadata_props:
            table = const_array(node.inputs[0])
            if table is not None and table.ndim == 3 and table.dtype == np.float32:
                out.append(node)
    return out


def quantize_table(w: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q, float32 scale [E, 1, N]) with w ~ q * scale, per expert and output channel."""
    qmax = (1 << (bits - 1)) - 1
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return q, scale


class _SelectedWeightsPass(ir.passes.InPlacePass):
    """A pass that quantizes the weights a selection names: all (``only`` None) or those in
    ``only``, never those in ``skip``; ``quantized`` lists (weight, node) after a call."""

    def __init__(self, only: Iterable[str] | None = None, skip: Iterable[str] = ()):
        super().__init__()
        self.only = None if only is None else set(only)
        self.skip = set(skip)
        self.quantized: list[tuple[str, str]] = []

    def selected(self, names: Iterable[str]) -> bool:
        """Whether every weight in ``names`` is to be quantized."""
        return all(n not in self.skip and (self.only is None or n in self.only) for n in names)


class QuantizeExpertTablesPass(_SelectedWeightsPass):
    """Quantize every gather-form expert table (or those in ``only``, never those in ``skip``)."""

    def __init__(self, only: Iterable[str] | None = None, skip: Iterable[str] = (), bits: int = 8):
        super().__init__(only, skip)
        self.bits = bits

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.quantized = []
        for node in expert_tables(model.graph):
            name = node.inputs[0].name
            if not self.selected([name]):
                continue
            uses = list(node.outputs[0].uses())
            if len(uses) != 1 or uses[0].node.op_type != "MatMul" or uses[0].idx != 1:
                continue
            self._rewrite(model.graph, node, uses[0].node)
            self.quantized.append((name, node_name(uses[0].node)))
        return ir.passes.PassResult(model, bool(self.quantized))

    def _rewrite(self, graph: ir.Graph, gather: ir.Node, matmul: ir.Node) -> None:
        q, scale = quantize_table(const_array(gather.inputs[0]), self.bits)
        name = gather.inputs[0].name
        flat = gather.inputs[1]
        tape = ir.tape.Tape()
        wq = tape.op("Gather", [add_initializer(graph, f"{name}_q", q), flat])
        wf = tape.op("Cast", [wq], {"to": ir.DataType.FLOAT})
        sg = tape.op("Gather", [add_initializer(graph, f"{name}_scale", scale), flat])
        graph.insert_before(matmul, list(tape.nodes))
        matmul.replace_input_with(1, wf)
        out = matmul.outputs[0]
        consumers = list(out.uses())
        tail = ir.tape.Tape()
        scaled = tail.op("Mul", [out, sg])
        graph.insert_after(matmul, list(tail.nodes))
        for use in consumers:
            use.node.replace_input_with(use.idx, scaled)
        for n in [*tape.nodes, *tail.nodes]:
            tag(n, type(self).__name__, weight=name)


def fused_banks(graph: ir.Graph) -> list[ir.Node]:
    """The fused form's float ``com.microsoft.MoE`` nodes with constant float32 expert weights."""
    out = []
    for node in graph:
        if node.domain == MS_DOMAIN and node.op_type == "MoE" and len(node.inputs) >= 5:
            ws = [const_array(node.inputs[i]) for i in (2, 4)]
            if all(w is not None and w.ndim == 3 and w.dtype == np.float32 for w in ws):
                out.append(node)
    return out


def qmoe_block_size(k_dims: Iterable[int], block_size: int = 128) -> int:
    """The largest power of two <= ``block_size`` (and >= 16, QMoE's minimum) dividing every
    reduction dim in ``k_dims``; 0 (per output channel) when there is none."""
    dims = list(k_dims)
    b = block_size
    while b >= 16 and any(k % b for k in dims):
        b //= 2
    return b if b >= 16 else 0


def quantize_blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 q + 128 [E, N, K], float32 scales [E, N] or [E, N, K / block]) of ``w [E, N, K]``:
    symmetric int8 per expert, output channel and block along K (block 0: the whole row)."""
    e, n, k = w.shape
    blocks = w.reshape(e, n, 1 if block_size == 0 else k // block_size, -1)
    amax = np.abs(blocks).max(axis=-1)
    scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8).reshape(e, n, k), (scale[..., 0] if block_size == 0 else scale)


class QuantizeFusedMoEPass(_SelectedWeightsPass):
    """Lower every fused-form MoE node to QMoE with int8 weights (``quantize_blocks``). A bank
    is quantized when neither weight is in ``skip`` and (``only`` None or) both are in
    ``only``: QMoE cannot keep one of them float."""

    def __init__(self, only: Iterable[str] | None = None, skip: Iterable[str] = (), block_size: int = 128):
        super().__init__(only, skip)
        self.block_size = block_size

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.quantized = []
        for node in fused_banks(model.graph):
            names = [node.inputs[i].name for i in (2, 4)]
            if not self.selected(names):
                continue
            self._rewrite(model.graph, node, names)
            self.quantized += [(n, node_name(node)) for n in names]
        if self.quantized:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, bool(self.quantized))

    def _rewrite(self, graph: ir.Graph, node: ir.Node, names: list[str]) -> None:
        ins = list(node.inputs) + [None] * (6 - len(node.inputs))
        ws = [const_array(ins[i]) for i in (2, 4)]  # [E, N, K] each: K = D for w1, H for w2
        block = qmoe_block_size([w.shape[2] for w in ws], self.block_size)
        packed = []
        for w, name in zip(ws, names, strict=True):
            q, scale = quantize_blocks(w, block)
            packed += [add_initializer(graph, f"{name}_q", q), add_initializer(graph, f"{name}_scale", scale)]
        attrs = {k: v.value for k, v in node.attributes.items()}
        blocked = [ir.AttrInt64("block_size", block)] if block else []
        qmoe = ir.Node(MS_DOMAIN, "QMoE",
                       [ins[0], ins[1], packed[0], packed[1], ins[3], packed[2], packed[3], ins[5]],
                       attributes=[ir.AttrInt64("expert_weight_bits", 8), ir.AttrInt64("accuracy_level", 4),
                                   *blocked, ir.AttrInt64("k", attrs["k"]),
                                   ir.AttrString("activation_type", attrs["activation_type"]),
                                   ir.AttrInt64("normalize_routing_weights",
                                                attrs.get("normalize_routing_weights", 0))],
                       num_outputs=1, name=f"{node_name(node)}_qmoe")
        qmoe.metadata_props.update(node.metadata_props)
        tag(qmoe, type(self).__name__, weights=",".join(names))
        graph.insert_before(node, qmoe)
        qmoe.outputs[0].shape, qmoe.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        node.outputs[0].replace_all_uses_with(qmoe.outputs[0])
        graph.remove(node, safe=True)
