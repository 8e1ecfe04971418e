"""The UG split: cut a captured program into a user graph and a group graph.

    user graph   user inputs [M, ...]                         -> boundary tensors [M, ...]
    group graph  group inputs [N, ...] + boundary [M, ...]
                 + user_index int64 [N]                       -> outputs [N, ...]

Each boundary tensor enters the group graph through ``index_select(b, 0,
user_index)`` (the only node this pass creates, tagged ``meta["ugsep.pass"]``).
The boundary is the set of user nodes read by group nodes, then shrunk: a cheap
op (view, expand, cast, elementwise) whose user inputs are smaller than its output
is moved to the group side, so the smaller tensor crosses the cut. A boundary must
keep the batch as its leading, unfolded dim; one that does not is moved too.
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from graph_passes.fx import rowwise
from graph_passes.fx._base import (
    BATCH_KEY,
    PASS_KEY,
    SIDE_KEY,
    PassResult,
    batch_factor,
    fqn_of,
    graph_module_of,
    module_path,
    op_name,
    source_line,
    state_of,
    tensor_val,
)
from graph_passes.fx.flops import FlopCountPass, ceiling
from graph_passes.fx.hoist_mixed import HoistMixedLayersPass
from graph_passes.fx.sides import SideAnalysisPass
from runtime.spec import FeatureSpec

log = logging.getLogger(__name__)
aten = torch.ops.aten
PASS_NAME = "SplitUserGroupPass"
USER_INDEX = "user_index"
CEILING_NS = (1, 16, 128, 512, 2048)
_CHEAP = (
    rowwise.ELEMENTWISE
    | rowwise.VIEWS
    | rowwise.PERMUTES
    | {
        aten.slice.Tensor,
        aten.select.int,
        aten.cat.default,
        aten.stack.default,
        aten.repeat.default,
        operator.getitem,
        aten.index.Tensor,
    }
)


@dataclass
class SplitResult:
    """The two graphs (None when nothing was hoisted), their I/O names and the report."""

    user: fx.GraphModule | None
    group: fx.GraphModule | None
    user_inputs: list[str] = field(default_factory=list)
    group_inputs: list[str] = field(default_factory=list)
    boundary: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def is_split(self) -> bool:
        return self.user is not None


class SplitUserGroupPass:
    """Split a captured program by the spec's sides; ``call`` returns PassResult(SplitResult)."""

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        minimise_boundary: bool = True,
        max_rounds: int = 64,
        hoist_mixed: bool = True,
    ):
        self.spec = spec
        self.hoist_mixed = hoist_mixed
        self.minimise_boundary = minimise_boundary
        self.max_rounds = max_rounds

    def call(self, ep: torch.export.ExportedProgram) -> PassResult:
        mixed_layers = self._hoist_mixed_layers(ep)
        forced: dict[str, str] = {}
        blocked: dict[str, dict[str, Any]] = {}  # across rounds: a demotion must not hide a block
        for _ in range(self.max_rounds):
            facts = SideAnalysisPass(self.spec, set(forced)).call(ep).facts
            blocked.update({b["node"]: b for b in facts["blocked"]})
            facts["blocked"] = list(blocked.values())
            gm = graph_module_of(ep)
            boundary = _boundary_nodes(gm, len(ep.graph_signature.user_outputs))
            if not self._demote(boundary, facts["batch_symbol"], forced):
                break
        s0 = facts["batch_symbol"]
        flops = FlopCountPass(s0).call(ep).facts["flops"]
        result = self._result(ep, gm, boundary, facts, flops, forced)
        if mixed_layers is not None:
            result.report["mixed_layers"] = mixed_layers
        return PassResult(result, result.is_split, {"split": result})

    def _hoist_mixed_layers(self, ep) -> dict[str, Any] | None:
        """Rewrite Linear/matmul/sum over a mixed input as user part + group part, in place.

        Returns the record for the report: what was rewritten and the user/group FLOPs per
        row before the rewrite (the split report's ``flops`` are after it).
        """
        if not self.hoist_mixed or not any(s.side == "mixed" for s in self.spec.inputs):
            return None
        facts = SideAnalysisPass(self.spec).call(ep).facts
        gm = graph_module_of(ep)
        before = FlopCountPass(facts["batch_symbol"]).call(ep).facts["flops"]
        sides = {n: n.meta[SIDE_KEY] for n in gm.graph.nodes if SIDE_KEY in n.meta}
        done = HoistMixedLayersPass(sides, facts["column_masks"]).call(ep).facts["rewritten"]
        return {
            "rewritten": done,
            "user_per_row_before": before["user"],
            "group_per_row_before": before["group"],
        }

    def _demote(self, boundary: list[fx.Node], s0, forced: dict[str, str]) -> bool:
        changed = False
        bset = set(boundary)
        for n in boundary:
            v = tensor_val(n)
            if n.op == "placeholder":
                continue
            if n.meta.get(BATCH_KEY) != (1, 1) or batch_factor(v.shape[0], s0) != 1:
                forced[n.name] = "boundary must keep the batch as its leading, unfolded dim"
                changed = True
            elif self.minimise_boundary and _smaller_before(n, bset, s0):
                forced[n.name] = "moved to the group side so a smaller tensor crosses the cut"
                changed = True
        return changed

    def _result(self, ep, gm, boundary, facts, flops, forced) -> SplitResult:
        u, g = flops["user"], flops["group"]
        report: dict[str, Any] = {
            "blocked": [b for b in facts["blocked"] if b["node"] not in forced],
            "moved": [{"node": k, "reason": r} for k, r in forced.items()],
            "flops": {
                "user_per_row": u,
                "group_per_row": g,
                "full_per_row": u + g,
                "const": flops["const"],
            },
            "ceiling": {str(n): round(ceiling(u, g, n), 4) for n in CEILING_NS},
            "hoisted_modules": _hoisted_modules(gm),
        }
        outputs = list(self.spec.outputs)
        if not boundary or not _does_work(gm):
            report["split"] = False
            report["reason"] = _why_not(report["blocked"])
            return SplitResult(None, None, outputs=outputs, report=report)
        names = facts["input_names"]
        built = _Builder(ep, gm, names, facts["batch_symbol"])
        user_gm, user_inputs = built.user_graph(boundary)
        group_gm, group_inputs = built.group_graph(boundary, _boundary_names(boundary))
        meta = [
            _boundary_entry(n, name)
            for n, name in zip(boundary, _boundary_names(boundary), strict=False)
        ]
        report["split"] = True
        report["boundary"] = meta
        return SplitResult(user_gm, group_gm, user_inputs, group_inputs, meta, outputs, report)


def _boundary_nodes(gm: fx.GraphModule, n_outputs: int) -> list[fx.Node]:
    """User nodes the group side reads on its way to the outputs, in graph order.

    Walked back from the model's outputs through group (and mixed, shape) nodes: a user
    node read only by dead code, or by a batch-size read, never crosses the cut.
    """
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    todo = [o for o in list(out_node.args[0])[-n_outputs:] if isinstance(o, fx.Node)]
    seen: set[fx.Node] = set()
    found: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        side = n.meta.get(SIDE_KEY)
        if side == "user":
            found.add(n)
        elif side != "shape" or n.meta.get("ugsep.shape_dep") not in (None, "const"):
            todo.extend(n.all_input_nodes)
    return [n for n in gm.graph.nodes if n in found]


_LOOKUPS = {aten.embedding.default, aten.index_select.default, aten.gather.default}


def _is_work(n: fx.Node) -> bool:
    """A hoisted node that computes or looks up (not a view or slice)."""
    return n.meta.get(SIDE_KEY) == "user" and (
        n.meta.get("ugsep.flops", 0) > 0 or n.target in _LOOKUPS
    )


def _does_work(gm: fx.GraphModule) -> bool:
    return any(_is_work(n) for n in gm.graph.nodes)


def _row_bytes(n: fx.Node, s0) -> int:
    v = tensor_val(n)
    numel = 1
    for d in v.shape:
        numel *= (batch_factor(d, s0) or 1) if isinstance(d, torch.SymInt) else int(d)
    return numel * v.element_size()


def _smaller_before(n: fx.Node, bset: set[fx.Node], s0) -> bool:
    """A cheap op whose not-yet-boundary user inputs are smaller than its output."""
    if n.target not in _CHEAP or any(c.meta.get(SIDE_KEY) == "user" for c in n.users):
        return False
    if tensor_val(n) is None:
        return False
    ins = [
        a for a in n.all_input_nodes if a.meta.get(SIDE_KEY) == "user" and tensor_val(a) is not None
    ]
    extra = sum(_row_bytes(a, s0) for a in ins if a not in bset)
    return _row_bytes(n, s0) > extra


def _boundary_names(boundary: list[fx.Node]) -> list[str]:
    return [f"u_{n.name}" for n in boundary]


def _boundary_entry(n: fx.Node, name: str) -> dict[str, Any]:
    v = tensor_val(n)
    return {
        "name": name,
        "dtype": str(v.dtype).replace("torch.", ""),
        "shape": ["M", *[int(d) for d in v.shape[1:]]],
        "source": module_path(n)
        or ("input" if n.op == "placeholder" else f"forward ({source_line(n) or n.name})"),
        "node": n.name,
        "op": "placeholder" if n.op == "placeholder" else op_name(n),
    }


def _hoisted_modules(gm: fx.GraphModule) -> list[str]:
    return sorted({module_path(n) for n in gm.graph.nodes if _is_work(n)} - {""})


def _why_not(blocked: list[dict[str, Any]]) -> str:
    if not blocked:
        return "no computation depends on user inputs alone"
    b = blocked[0]
    return (
        f"nothing hoistable: {b['op']} at {b['module'] or 'top level'} ({b['node']}) "
        f"is not row-wise: {b['reason']}"
    )


def _safe(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    return s if s and not s[0].isdigit() else f"_{s}"


class _Builder:
    """Copies the needed part of the captured graph into a fresh graph for one side."""

    def __init__(self, ep, gm: fx.GraphModule, names: dict[str, str], s0) -> None:
        self.ep, self.gm, self.names, self.s0 = ep, gm, names, s0
        self.state, self.fqn = state_of(ep), fqn_of(ep)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def _needed(self, roots: list[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        todo = list(roots)
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in stop or self._batch_size_node(n):
                continue
            todo.extend(n.all_input_nodes)
        return seen

    def _batch_size_node(self, n: fx.Node) -> int | None:
        if n.op == "call_function" and n.target is aten.sym_size.int:
            return batch_factor(tensor_val(n.args[0]).shape[n.args[1]], self.s0)
        return None

    def _copy(self, g: fx.Graph, needed: set[fx.Node], env: dict, anchor: fx.Node) -> None:
        for n in sorted(needed, key=self.order.__getitem__):
            if n in env:
                continue
            if n.op == "placeholder":
                env[n] = g.get_attr(self.fqn[n.name])
            elif (c := self._batch_size_node(n)) is not None:
                env[n] = _sym_batch(g, anchor, c)
            else:
                env[n] = g.node_copy(n, lambda a: env[a])

    def _module(self, g: fx.Graph) -> fx.GraphModule:
        root = {t: self.state[ph] for ph, t in self.fqn.items()}
        g.lint()
        return fx.GraphModule(root, g)

    def user_graph(self, boundary: list[fx.Node]) -> tuple[fx.GraphModule, list[str]]:
        needed = self._needed(boundary, set())
        g, env, inputs = fx.Graph(), {}, []
        for n in self.gm.graph.nodes:
            if n.op == "placeholder" and n.name in self.names and n in needed:
                env[n] = g.placeholder(_safe(self.names[n.name]))
                inputs.append(self.names[n.name])
        anchor = next(iter(env.values())) if env else None
        self._copy(g, needed, env, anchor)
        g.output(tuple(env[b] for b in boundary))
        return self._module(g), inputs

    def group_graph(self, boundary, bnames) -> tuple[fx.GraphModule, list[str]]:
        out_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        n_user_out = len(self.ep.graph_signature.user_outputs)
        outs = list(out_node.args[0])[-n_user_out:]
        roots = [o for o in outs if isinstance(o, fx.Node)]
        needed = self._needed(roots, set(boundary))
        g, env, inputs = fx.Graph(), {}, []
        for n in self.gm.graph.nodes:
            if (
                n.op == "placeholder"
                and n.name in self.names
                and n in needed
                and n.meta.get(SIDE_KEY) != "user"
            ):
                env[n] = g.placeholder(_safe(self.names[n.name]))
                inputs.append(self.names[n.name])
        phs = [g.placeholder(_safe(b)) for b in bnames]
        index = g.placeholder(USER_INDEX)
        for b, ph in zip(boundary, phs, strict=False):
            env[b] = g.call_function(aten.index_select.default, (ph, 0, index))
            env[b].meta[PASS_KEY] = PASS_NAME
        self._copy(g, needed, env, index)
        g.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in outs))
        return self._module(g), [*inputs, *bnames, USER_INDEX]


def _sym_batch(g: fx.Graph, anchor: fx.Node, factor: int) -> fx.Node:
    """The batch size of this side (recomputed from its own input), times ``factor``."""
    size = g.call_function(aten.sym_size.int, (anchor, 0))
    size.meta[PASS_KEY] = PASS_NAME
    if factor == 1:
        return size
    scaled = g.call_function(operator.mul, (size, factor))
    scaled.meta[PASS_KEY] = PASS_NAME
    return scaled
