"""Canonicalise linear layers so every constant-weight matmul is a quantizable 2-D MatMul.

    GemmToMatMulPass            Gemm(A, B, C) with constant B  ->  MatMul(A, B') [+ Add(C')]
    UnrollBatchedMatMulPass     MatMul(x[T,B,D], W[T,D,H]) with constant W (per-token FFN
                                weights from einsum/bmm)  ->  T MatMuls on W[t] + Concat
    canonicalize_linear(model)  constant folding, the two rewrites above, dead-code removal

ORT's MatMulNBits quantizer, TensorRT's weight-only path and our QuantizeWeightsInt8Pass all
look for MatMul(activation, 2-D constant); these passes bring Gemm and per-token weights into
that form without changing the numbers (up to float rounding of alpha/beta scaling).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes.onnx._util import Refusal, add_initializer, const_array, node_name, tag
from graph_passes.onnx.per_token import per_token_plan

log = logging.getLogger(__name__)


class GemmToMatMulPass(ir.passes.InPlacePass):
    """Rewrite every ``Gemm`` with a constant weight to ``MatMul`` (+ ``Add`` for the bias).

    Refuses (recording why in ``self.refusals``) when the weight is not a constant or when
    ``transA=1`` (then the activation, not the weight, is transposed).
    """

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[Refusal] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.refusals = []
        modified = False
        for node in list(model.graph):
            if node.op_type == "Gemm" and node.domain == "":
                reason = self._try_rewrite(model.graph, node)
                if reason is None:
                    modified = True
                else:
                    self.refusals.append(Refusal(node_name(node), node.op_type, reason))
                    log.info("GemmToMatMulPass: left %s alone: %s", node_name(node), reason)
        return ir.passes.PassResult(model, modified)

    def _try_rewrite(self, graph: ir.Graph, node: ir.Node) -> str | None:
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        attrs = {k: v.value for k, v in node.attributes.items()}
        if attrs.get("transA", 0):
            return "transA=1: the activation is transposed, not a plain linear layer"
        weight = const_array(b)
        if weight is None:
            return f"weight '{b.name}' is not a constant"
        bias = const_array(c) if c is not None else None
        if c is not None and bias is None:
            return f"bias '{c.name}' is not a constant"
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        weight = weight.T if attrs.get("transB", 0) else weight
        if alpha != 1.0:
            weight = weight * np.asarray(alpha, dtype=weight.dtype)
        w = add_initializer(graph, f"{b.name}_kn", np.ascontiguousarray(weight))
        name = self.__class__.__name__
        matmul = tag(ir.Node("", "MatMul", [a, w], name=f"{node.name}_matmul"), name)
        new_nodes, out = [matmul], matmul.outputs[0]
        if bias is not None:
            bias_v = add_initializer(graph, f"{c.name}_beta", (bias * np.asarray(beta, bias.dtype)))
            add = tag(ir.Node("", "Add", [out, bias_v], name=f"{node.name}_bias"), name)
            new_nodes.append(add)
            out = add.outputs[0]
        _replace(graph, node, new_nodes, out)
        return None


class UnrollBatchedMatMulPass(ir.passes.InPlacePass):
    """Unroll a per-token matmul with a constant 3-D weight ``W[T, D, H]`` into T 2-D MatMuls.

    Handles ``MatMul(x[T, B, D], W)`` (bmm exports) and ``Einsum`` of the form
    ``"btd,tdh->bth"`` (any letters/token position; the weight may be ``[T, H, D]``; the plan
    is ``per_token.per_token_plan``). Exported stages arrive with the einsums already in
    MatMul form (``per_token.PerTokenEinsumToMatMulPass``, token axis 0), which this unrolls.
    Per-token FFN weights (RankMixer-style) are a batched matmul that no 2-D weight-only
    kernel accepts; ``Split`` along the token axis, ``x[t] @ W[t]`` per token (MatMul
    broadcasts over the kept unit axis) and ``Concat`` back is the same computation in
    quantizable form (2 + T ops).
    """

    def __init__(self, max_tokens: int = 64) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.refusals: list[Refusal] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.refusals = []
        modified = False
        for node in list(model.graph):
            if (
                node.op_type not in ("MatMul", "Einsum")
                or node.domain != ""
                or len(node.inputs) != 2
            ):
                continue
            w = const_array(node.inputs[1])
            if w is None or w.ndim != 3:
                continue  # not a batched constant weight: nothing to unroll (not a refusal)
            plan = per_token_plan(node) if node.op_type == "Einsum" else _matmul_plan(node, w)
            reason = (
                plan if isinstance(plan, str) else self._try_unroll(model.graph, node, w, *plan)
            )
            if reason is None:
                modified = True
            else:
                self.refusals.append(Refusal(node_name(node), node.op_type, reason))
                log.info("UnrollBatchedMatMulPass: left %s alone: %s", node_name(node), reason)
        return ir.passes.PassResult(model, modified)

    def _try_unroll(
        self, graph: ir.Graph, node: ir.Node, w: np.ndarray, axis: int, w_t: bool
    ) -> str | None:
        x, tokens = node.inputs[0], w.shape[0]
        if isinstance(x.shape[axis], int) and x.shape[axis] != tokens:
            return f"activation has {x.shape[axis]} tokens on axis {axis}, the weight has {tokens}"
        if tokens > self.max_tokens:
            return f"{tokens} tokens exceed max_tokens={self.max_tokens}"
        name, base = self.__class__.__name__, node.name or node.outputs[0].name
        sizes = add_initializer(graph, f"{base}_split", np.ones(tokens, dtype=np.int64))
        split = ir.Node(
            "",
            "Split",
            [x, sizes],
            attributes=[ir.AttrInt64("axis", axis)],
            num_outputs=tokens,
            name=f"{base}_split",
        )
        new_nodes, pieces = [tag(split, name)], []
        for t in range(tokens):
            w_name = f"{node.inputs[1].name}.t{t}"  # layer names in reports: "ffn.w1.t3"
            wt = add_initializer(graph, w_name, np.ascontiguousarray(w[t].T if w_t else w[t]))
            # [.., 1, .., D] @ [D, H] -> [.., 1, .., H]: MatMul broadcasts, no squeeze needed
            mm = ir.Node("", "MatMul", [split.outputs[t], wt], name=f"{base}_tok{t}")
            new_nodes.append(tag(mm, name, token=t))
            pieces.append(mm.outputs[0])
        cat = ir.Node(
            "", "Concat", pieces, attributes=[ir.AttrInt64("axis", axis)], name=f"{base}_cat"
        )
        new_nodes.append(tag(cat, name))
        _replace(graph, node, new_nodes, cat.outputs[0])
        return None


def _matmul_plan(node: ir.Node, w: np.ndarray) -> tuple[int, bool] | str:
    x = node.inputs[0]
    if x.shape is None or len(x.shape) != 3:
        return f"activation '{x.name}' is not known to be rank 3 (shape {x.shape})"
    return 0, False


def _replace(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], new_out: ir.Value) -> None:
    """Put ``new_nodes`` where ``old`` was and route its output (and name, if a graph output)."""
    ir.convenience.replace_nodes_and_values(
        graph, old, [old], new_nodes, [old.outputs[0]], [new_out]
    )


def canonicalize_linear(model: ir.Model, *, unroll_batched: bool = True) -> ir.passes.PassResult:
    """Fold constants, canonicalise linear layers, remove dead code (in place, one place in order).

    Order: folding first exposes constant weights hidden behind Transpose/Reshape/Constant
    nodes; the rewrites then see plain constants; dead code (old weights, folded chains) last.
    """
    from onnxscript.optimizer._constant_folding import FoldConstantsPass

    passes: list[ir.passes.PassBase] = [
        FoldConstantsPass(
            shape_inference=True, input_size_limit=1 << 24, output_size_limit=1 << 24
        ),
        GemmToMatMulPass(),
    ]
    if unroll_batched:
        passes.append(UnrollBatchedMatMulPass())
    passes += [
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
        common_passes.RemoveUnusedOpsetsPass(),
    ]
    return ir.passes.Sequential(*passes)(model)
