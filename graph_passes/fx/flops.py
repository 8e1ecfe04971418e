"""FLOP accounting: ``meta["ugsep.flops"]`` per node at batch size 1, totals per side.

Counts are the usual roofline conventions: 2·M·N·K for contractions, one FLOP per
output element for elementwise ops (per input element for reductions), ~5 per element for softmax / normalisation,
nothing for views, indexing and embedding lookups (memory, not arithmetic).
Constant-only nodes (weight preprocessing) run once per call and are not per row.
"""

from __future__ import annotations

import math

import sympy
import torch
from torch import fx

from graph_passes.fx import rowwise
from graph_passes.fx._base import (
    FLOPS_KEY,
    SIDE_KEY,
    PassResult,
    graph_module_of,
    sym_expr,
    tensor_val,
)

aten = torch.ops.aten
_FREE = (
    rowwise.VIEWS
    | rowwise.PERMUTES
    | {
        aten.embedding.default,
        aten.slice.Tensor,
        aten.select.int,
        aten.index.Tensor,
        aten.index_select.default,
        aten.gather.default,
        aten.cat.default,
        aten.stack.default,
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.chunk.default,
        aten.unbind.int,
        aten.expand.default,
        aten.repeat.default,
        aten.clone.default,
        aten.contiguous.default,
        aten.alias.default,
        aten.detach.default,
        aten.dropout.default,
        aten._to_copy.default,
        aten.to.dtype,
        aten.narrow.default,
        aten.lift_fresh_copy.default,
    }
)
_HEAVY = {
    aten.softmax.int,
    aten._softmax.default,
    aten.log_softmax.int,
    aten.layer_norm.default,
    aten.rms_norm.default,
    aten._log_softmax.default,
}


def _numel(v: torch.Tensor) -> sympy.Expr:
    return sympy.Mul(*[sym_expr(d) for d in v.shape]) if v.dim() else sympy.Integer(1)


def node_flops(node: fx.Node) -> sympy.Expr:
    """Symbolic FLOPs of one call_function node (in the batch symbol)."""
    if node.op != "call_function":
        return sympy.Integer(0)
    out = tensor_val(node)
    t = node.target
    if out is None or t in _FREE:
        return sympy.Integer(0)
    if t is aten.linear.default:
        k = sym_expr(tensor_val(node.args[0]).shape[-1])
        return 2 * _numel(out) * k
    if t in (
        aten.mm.default,
        aten.bmm.default,
        aten.matmul.default,
        aten.addmm.default,
        aten.baddbmm.default,
    ):
        a = tensor_val(node.args[-2])
        return 2 * _numel(out) * sym_expr(a.shape[-1])
    if t is aten.einsum.default:
        return _einsum_flops(node)
    if t is aten.scaled_dot_product_attention.default:
        q, k = tensor_val(node.args[0]), tensor_val(node.args[1])
        s = sym_expr(k.shape[-2])
        return 2 * _numel(q) * s + 2 * _numel(out) * s + 5 * _numel(q) / sym_expr(q.shape[-1]) * s
    if t in _HEAVY:
        return 5 * _numel(out)
    if t in rowwise.ALONG_DIMS and tensor_val(node.args[0]) is not None:
        return _numel(tensor_val(node.args[0]))  # reductions/scans: one op per input element
    return _numel(out)


def _einsum_flops(node: fx.Node) -> sympy.Expr:
    eq = node.args[0].replace(" ", "")
    sizes: dict[str, sympy.Expr] = {}
    for spec, op in zip(eq.split("->")[0].split(","), node.args[1], strict=False):
        for letter, d in zip(spec, tensor_val(op).shape, strict=False):
            sizes[letter] = sym_expr(d)
    return 2 * math.prod(sizes.values())


class FlopCountPass:
    """Annotate ``meta["ugsep.flops"]`` (FLOPs at batch size 1) and total them per side."""

    def __init__(self, batch_symbol: sympy.Symbol) -> None:
        self.s0 = batch_symbol

    def call(self, gm_or_ep) -> PassResult:
        gm = graph_module_of(gm_or_ep)
        totals = {"user": 0, "group": 0, "const": 0}
        for node in gm.graph.nodes:
            expr = sympy.sympify(node_flops(node))
            per_row = int(expr.subs(self.s0, 1))
            node.meta[FLOPS_KEY] = per_row
            side = node.meta.get(SIDE_KEY, "group")
            side = "group" if side == "mixed" else side  # mixed tensors run per candidate
            if self.s0 not in expr.free_symbols:
                side = "const"
            if side in totals:
                totals[side] += per_row
        return PassResult(gm, False, {"flops": totals})


def ceiling(user_per_row: float, group_per_row: float, n: int) -> float:
    """Speedup bound of the split at N candidates: runtime.ceiling.flop_ceiling."""
    from runtime.ceiling import flop_ceiling

    return flop_ceiling(user_per_row, group_per_row, n)
