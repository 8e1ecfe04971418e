"""Row-scope analysis: is every row of a batch scored from its own inputs alone?

The UG split proves its user nodes row-wise (``rowwise.prove``) before it hoists them.
This analysis runs the same proof over the WHOLE captured graph, every model input
batched: if every node keeps the batch rows apart, a row's outputs depend on that row
only, and the server may put several requests' candidates in one call (and cut a
request's candidates into several). If a node mixes rows — a softmax over the request's
candidates (a listwise score), a batch statistic, a position ``arange(B)`` — the model's
answer for a request depends on which rows share the call: the bundle is
*request-scoped*, and each request must be scored in a call of its own.

The split hoists only proven user nodes, so whatever mixes rows is on the group side:
the group graph is row-wise exactly when the full graph is. The result (``facts``):

    rowwise   bool: no node mixes rows
    mixing    [{"node", "op", "reason", "module", "source"}]: the nodes whose own inputs are
              proven row-wise but which mix rows (what to change); nodes downstream of
              them are not listed
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from graph_passes.fx import rowwise
from graph_passes.fx._base import (
    PassResult,
    batch_factor,
    batch_symbol,
    graph_module_of,
    module_path,
    op_name,
    source_line,
    sym_expr,
    tensor_val,
    user_input_names,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten
ROWS, REQUEST = "rows", "request"
"""Scope values: ``rows`` (row-wise, requests may be merged and cut), ``request``."""
_SHAPE_READS = {
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten._assert_tensor_metadata.default,  # checks dtype/device only, reads no values
}


class RowScopeAnalysis:
    """Prove whether a captured program keeps the rows of its batch apart (modified=False)."""

    def call(self, ep: torch.export.ExportedProgram) -> PassResult:
        gm = graph_module_of(ep)
        names = user_input_names(ep)
        self.s0 = batch_symbol(ep, list(names))
        self.batched: set[fx.Node] = set()
        self.tainted: set[fx.Node] = set()
        self.layout: dict[fx.Node, tuple[int, int]] = {}
        self.mixing: list[dict[str, Any]] = []
        self.ctx = rowwise.ProofContext(self.s0, self.batched.__contains__, self.layout)
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node.name in names and tensor_val(node) is not None:
                self.batched.add(node)
                self.layout[node] = (1, 1)
            elif node.op == "call_function":
                self._visit(node)
        facts = {"rowwise": not self.mixing, "mixing": self.mixing}
        return PassResult(gm, False, facts)

    def _visit(self, node: fx.Node) -> None:
        ins = node.all_input_nodes
        if any(a in self.tainted for a in ins):
            self.tainted.add(node)  # downstream of a mixing node: not its own cause
            return
        batched = [a for a in ins if a in self.batched]
        if not _tensorish(node):
            if batched and node.target not in _SHAPE_READS:
                self._mix(node, "it reads a value out of the batch (data-dependent scalar)")
            return
        if batched and node.target not in rowwise.ROW_UNIFORM_FACTORIES:  # new_zeros(x, ..)
            res = rowwise.prove(node, self.ctx)
            if isinstance(res, str):
                self._mix(node, res)
            else:
                self.batched.add(node)
                self.layout[node] = res
            return
        self._visit_unbatched(node)

    def _visit_unbatched(self, node: fx.Node) -> None:
        """A node fed by constants and shapes only: uniform over rows, unless it is not."""
        if node.target in rowwise.ROW_UNIFORM_FACTORIES:
            return  # zeros/ones/full(B, ...): rowwise.prove knows these
        val = tensor_val(node)
        if val is None or not any(self.s0 in sym_expr(d).free_symbols for d in val.shape):
            return  # a constant
        if node.target in rowwise.VIEWS or node.target in rowwise.ELEMENTWISE:
            dims = [i for i, d in enumerate(val.shape) if self.s0 in sym_expr(d).free_symbols]
            c = batch_factor(val.shape[dims[0]], self.s0) if len(dims) == 1 else None
            if c is not None and dims[0] == 0:  # a constant broadcast along the batch
                self.batched.add(node)
                self.layout[node] = (1, c)
                return
        self._mix(node, "its values depend on the row's position in the batch")

    def _mix(self, node: fx.Node, reason: str) -> None:
        self.tainted.add(node)
        entry = {
            "node": node.name,
            "op": op_name(node),
            "reason": reason,
            "module": module_path(node),
            "source": source_line(node),
        }
        self.mixing.append(entry)
        log.info("row scope: %s mixes batch rows: %s", node.name, reason)


def _tensorish(node: fx.Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return any(isinstance(v, torch.Tensor) for v in vals)


def row_scope(ep: torch.export.ExportedProgram, split: bool) -> dict[str, Any]:
    """The manifest's ``row_scope`` record of a captured program (split: has user/group).

    ``{"full": "rows"|"request", "user": "rows", "group": ..., "mixing": [...]}``; the user
    side is row-wise by construction (the split hoists only proven nodes).
    """
    facts = RowScopeAnalysis().call(ep).facts
    scope = ROWS if facts["rowwise"] else REQUEST
    out: dict[str, Any] = {"full": scope}
    if split:
        out.update(user=ROWS, group=scope)
    out["mixing"] = facts["mixing"]
    return out
