"""W8A16 for sparse MoE expert tables in the gather form (graph_passes.onnx.moe).

    QuantizeExpertTablesPass(only, skip, bits)
        Gather(W[T*E, K, N], flat) -> MatMul(A, .)
    ->  Mul(MatMul(A, Cast(Gather(Wq[T*E, K, N] int8, flat))), Gather(scale[T*E, 1, N], flat))

Symmetric int8 per expert and per output channel: one scale per (token, expert, output
column), so an expert's scale never depends on another expert's range. The scale is applied
after the MatMul (it is constant along the reduction axis K), on the [.., 1, N] output
instead of the gathered [.., K, N] weight; only int8 bytes are gathered. Expert banks in the
``grouped`` form are plain 2-D MatMuls (``<bank>.w1.t<t>.e<e>``) and go through
QuantizeWeightsInt8Pass like any linear layer; both count as one layer group per bank weight
for the accuracy-budgeted selection (exporter.steps.quantize.group_of).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from graph_passes.onnx._util import add_initializer, const_array, node_name, tag

__all__ = ["QuantizeExpertTablesPass", "expert_tables", "quantize_table"]
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


class QuantizeExpertTablesPass(ir.passes.InPlacePass):
    """Quantize every gather-form expert table (or those in ``only``, never those in ``skip``)."""

    def __init__(self, only: Iterable[str] | None = None, skip: Iterable[str] = (), bits: int = 8):
        super().__init__()
        self.only = None if only is None else set(only)
        self.skip, self.bits = set(skip), bits
        self.quantized: list[tuple[str, str]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.quantized = []
        for node in expert_tables(model.graph):
            name = node.inputs[0].name
            if name in self.skip or (self.only is not None and name not in self.only):
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
