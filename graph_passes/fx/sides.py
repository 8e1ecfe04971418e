"""Side analysis: which nodes depend only on user inputs and are proven row-wise.

Every node gets ``meta["ugsep.side"]`` in {user, group, const, shape}:

- placeholders by the spec (``arg.key`` for dict leaves); parameters, buffers and
  lifted constants are ``const``;
- values that are not tensors (sym_size, shape arithmetic) are ``shape``; a shape
  that only involves the batch symbol is recomputed on each side of the cut, never
  carried across it;
- a node reading any group value is ``group``; a node reading user values (and
  constants) is ``user`` only when ``rowwise.prove`` shows it keeps batch rows apart,
  else it is ``group`` and recorded in ``blocked`` with its op, module and source line;
- a ``mixed`` input (columns form of the spec) is followed element by element
  (graph_passes.fx.columns): slices, gathers, cats, views and elementwise ops keep its
  column provenance; a tensor that reads only user columns is ``user``, one whose every
  element reads a group column is ``group``, anything in between stays ``mixed``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from graph_passes.fx import rowwise
from graph_passes.fx._base import (
    BATCH_KEY,
    SIDE_KEY,
    PassResult,
    batch_factor,
    batch_symbol,
    graph_module_of,
    module_path,
    op_name,
    source_line,
    state_of,
    tensor_val,
    user_input_names,
)
from graph_passes.fx.columns import ColumnTracker, input_mask
from graph_passes.onnx.errors import PassError
from runtime.spec import FeatureSpec

log = logging.getLogger(__name__)
aten = torch.ops.aten
COLUMNS_KEY = "ugsep.columns"


class SideAnalysisPass:
    """Annotate every node of a captured program with its side (an analysis: modified=False).

    ``forced_group`` names nodes the cut wants on the group side (boundary
    minimisation); they and everything downstream are group-side.
    """

    def __init__(self, spec: FeatureSpec, forced_group: set[str] | None = None) -> None:
        self.spec = spec
        self.forced_group = set(forced_group or ())

    def call(self, ep: torch.export.ExportedProgram) -> PassResult:
        gm = graph_module_of(ep)
        names = user_input_names(ep)
        self._check_inputs(names)
        self.s0 = batch_symbol(ep, list(names))
        self.side: dict[fx.Node, str] = {}
        self.dep: dict[fx.Node, str | None] = {}
        self.layout: dict[fx.Node, tuple[int, int]] = {}
        self.blocked: list[dict[str, Any]] = []
        self.ctx = rowwise.ProofContext(self.s0, lambda n: self.side.get(n) == "user", self.layout)
        self.columns = ColumnTracker(self.s0, _const_values(ep))
        self.from_group: set[fx.Node] = set()  # downstream of a group (not mixed) input
        self.has_mixed = any(s.side == "mixed" for s in self.spec.inputs)
        for node in gm.graph.nodes:
            self._visit(node, names)
            if node in self.side:
                node.meta[SIDE_KEY] = self.side[node]
            if node in self.layout:
                node.meta[BATCH_KEY] = self.layout[node]
        facts = {
            "batch_symbol": self.s0,
            "blocked": self.blocked,
            "input_names": names,
            "column_masks": self.columns.masks,
        }
        return PassResult(gm, False, facts)

    def _check_inputs(self, names: dict[str, str]) -> None:
        declared = {s.name for s in self.spec.inputs}
        unknown = sorted(set(names.values()) - declared)
        if unknown:
            raise PassError(
                f"the captured program takes inputs {unknown} that spec '{self.spec.name}' does "
                f"not declare (it declares {sorted(declared)})"
            )

    def _visit(self, node: fx.Node, names: dict[str, str]) -> None:
        if node.op == "placeholder":
            self._visit_placeholder(node, names)
        elif node.op == "get_attr":
            self.side[node] = "const"
        elif node.op == "call_function":
            self._visit_call(node)

    def _visit_placeholder(self, node: fx.Node, names: dict[str, str]) -> None:
        if node.name not in names:
            self.side[node] = "const"
            return
        s = self.spec.input(names[node.name])
        if s.side == "mixed":
            self.side[node] = "mixed"
            node.meta[COLUMNS_KEY] = s.columns
            self.columns.masks[node] = input_mask(s.shape, set(s.user_columns()))
        else:
            self.side[node] = s.side
            if s.side == "group":
                self.from_group.add(node)
            if s.side == "user":
                self.layout[node] = (1, 1)

    def _visit_call(self, node: fx.Node) -> None:
        if not _is_tensorish(node):
            self.side[node] = "shape"
            self.dep[node] = self._shape_dep(node)
            return
        ins = {self._input_side(a) for a in node.all_input_nodes} - {None, "const", "shape"}
        if any(a in self.from_group for a in node.all_input_nodes):
            self.from_group.add(node)
        by_column = "mixed" in ins or ("group" in ins and "user" in ins and self.has_mixed)
        if by_column:
            self._visit_mixed(node, forced=node.name in self.forced_group)
        elif node.name in self.forced_group:
            self.side[node] = "group"
        elif "group" in ins:
            self.side[node] = "group"
        elif "user" in ins:
            self._visit_user(node)
        else:
            self.side[node] = self._factory_side(node)

    def _input_side(self, a: fx.Node) -> str | None:
        side = self.side.get(a)
        return self.dep.get(a) if side == "shape" else side

    def _shape_dep(self, node: fx.Node) -> str | None:
        dep = self._shape_dep_of(node)
        node.meta["ugsep.shape_dep"] = dep
        return dep

    def _shape_dep_of(self, node: fx.Node) -> str | None:
        if node.target is aten.sym_size.int:
            src, dim = node.args[0], node.args[1]
            if batch_factor(tensor_val(src).shape[dim], self.s0) is not None:
                return None  # a batch size: recomputed on each side
            return _worst(self._input_side(src))
        sides = {self._input_side(a) for a in node.all_input_nodes}
        return _worst(*sides)

    def _visit_user(self, node: fx.Node) -> None:
        res = rowwise.prove(node, self.ctx)
        if isinstance(res, tuple):
            self.side[node] = "user"
            self.layout[node] = res
            return
        self.side[node] = "group"
        self.blocked.append(_blocked_entry(node, res))
        log.info("user-side node %s stays group-side: %s", node.name, res)

    def _factory_side(self, node: fx.Node) -> str:
        """Nodes fed only by constants/shapes: constants, unless their rows differ (arange(B))."""
        vals = _tensor_vals(node)
        batched = any(self.s0 in _free(v) for v in vals)
        if batched and node.target not in rowwise.ROW_UNIFORM_FACTORIES:
            return "group"
        return "const"

    def _visit_mixed(self, node: fx.Node, *, forced: bool = False) -> None:
        """Column provenance (graph_passes.fx.columns) decides user / group / still mixed.

        A node the cut moved off the boundary (``forced``) stays ``mixed``, not group: each
        side recomputes it from the mixed input, and its user columns stay hoistable.
        """
        side = self.columns.side_of(node, self.side)
        if side == "user" and (forced or node in self.from_group):
            side = "mixed"  # the user graph cannot compute what reads a group input proper
        self.side[node] = side
        if side == "user":
            self.layout[node] = (1, 1)


def _const_values(ep):
    """A constant node's tensor: lifted state, a get_attr, or a constant folded at capture."""
    state, gm = state_of(ep), graph_module_of(ep)

    def value_of(n: fx.Node) -> torch.Tensor:
        if n.op == "placeholder" and n.name in state:
            return state[n.name]
        if n.op == "get_attr":
            obj = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        raise ValueError(f"{n.name} is not a stored constant")

    return value_of


def _blocked_entry(node: fx.Node, reason: str) -> dict[str, Any]:
    return {
        "node": node.name,
        "op": op_name(node),
        "reason": reason,
        "module": module_path(node),
        "source": source_line(node),
    }


def _is_tensorish(node: fx.Node) -> bool:
    return bool(_tensor_vals(node)) or isinstance(node.meta.get("val"), torch.Tensor)


def _tensor_vals(node: fx.Node) -> list[torch.Tensor]:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def _free(v: torch.Tensor) -> set:
    from graph_passes.fx._base import sym_expr

    out: set = set()
    for d in v.shape:
        out |= sym_expr(d).free_symbols
    return out


def _worst(*sides: str | None) -> str | None:
    for s in ("group", "mixed", "user", "const"):
        if s in sides:
            return s
    return None
