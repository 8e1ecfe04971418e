"""Hoist the user share of mixed layers: one contraction or sum over user and candidate parts.

CTR models (DeepFM, DCN, Wide&Deep ...) concatenate user and candidate embeddings and
feed the result to a Linear, a matmul or a factorization-machine sum. Such a layer reads
both sides, so the split cannot hoist it, although it is a sum of a user part and a
candidate part:

    linear(cat(u, g), W, b)   = linear(u, W[:, U]) + linear(g, W[:, G], b)
    matmul(cat(u, g), W)      = matmul(u, W[U, :]) + matmul(g, W[G, :])
    sum(cat(u, g), dim)       = sum(u, dim) + sum(g, dim)        (FM: (Σv)² − Σv²)

Positions along the contracted (summed) dim are sorted by column provenance
(graph_passes.fx.columns): those every element of which reads only user columns form U,
the rest G. Any partition gives the same value up to float reassociation (parity checks
it), so the rule needs no proof beyond the shapes. The user part then runs once per
request. Rules: a pattern (node with a mixed input), a check that says why it refuses,
a replacement of slices and cats. The graph is rewritten in place; each node made here
carries ``meta["ugsep.pass"] = "HoistMixedLayersPass"``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode

from graph_passes.fx._base import PASS_KEY, PassResult, graph_module_of, module_path, tensor_val
from graph_passes.fx.columns import USER

log = logging.getLogger(__name__)
aten = torch.ops.aten
PASS_NAME = "HoistMixedLayersPass"
_SUMS = {aten.sum.dim_IntList}
_CONTRACTIONS = {aten.linear.default, aten.matmul.default, aten.mm.default}


class HoistMixedLayersPass:
    """Rewrite each mixed Linear / matmul / sum as a user part plus a group part.

    ``sides`` and ``masks`` come from SideAnalysisPass on the same program (its facts).
    """

    def __init__(self, sides: dict[fx.Node, str], masks: dict[fx.Node, Any]) -> None:
        self.sides, self.masks = sides, masks

    def call(self, ep) -> PassResult:
        gm = graph_module_of(ep)
        rewritten = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            refusal = self._try_rewrite(gm, node)
            if refusal is None:
                rewritten.append({"node": node.name, "op": str(node.target), "module": module_path(node)})
            elif refusal:
                log.debug("mixed layer %s not split: %s", node.name, refusal)
        if rewritten:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, bool(rewritten), {"rewritten": rewritten})

    def _try_rewrite(self, gm: fx.GraphModule, node: fx.Node) -> str | None:
        """None when rewritten, else why not ('' when the node is not a candidate at all)."""
        if node.target not in _SUMS | _CONTRACTIONS:
            return ""
        x = node.args[0]
        if self.sides.get(x) != "mixed" or x not in self.masks:
            return ""
        dim = self._dim(node, x)
        if dim is None:
            return "the reduced dim is not a single non-batch dim of the mixed input"
        if node.target in _CONTRACTIONS and self.sides.get(node.args[1]) != "const":
            return "the weight is not a constant"
        user = _user_positions(self.masks[x], dim)
        if not any(user) or all(user):
            return "no position along the reduced dim reads only user columns"
        _Rewriter(gm, node, x, dim, user).apply()
        return None

    @staticmethod
    def _dim(node: fx.Node, x: fx.Node) -> int | None:
        rank = tensor_val(x).dim()
        if node.target in _CONTRACTIONS:
            w = tensor_val(node.args[1])
            if w is None or w.dim() != 2 or rank < 2:
                return None
            return rank - 1
        dims = node.args[1] if len(node.args) > 1 else None
        if not isinstance(dims, (list, tuple)) or len(dims) != 1:
            return None
        d = dims[0] + rank if dims[0] < 0 else dims[0]
        return d if d > 0 else None


def _user_positions(mask: torch.Tensor, dim: int) -> list[bool]:
    return [bool((mask.select(dim, i) == USER).all()) for i in range(mask.shape[dim])]


def _runs(flags: list[bool], want: bool) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, f in enumerate([*flags, not want]):
        if f == want and start is None:
            start = i
        elif f != want and start is not None:
            runs.append((start, i))
            start = None
    return runs


class _Rewriter:
    """Builds the user part + group part of one node just before it, then replaces it."""

    def __init__(self, gm, node, x, dim, user) -> None:
        self.g, self.node, self.x, self.dim, self.user = gm.graph, node, x, dim, user
        self.fake = detect_fake_mode([tensor_val(x)])

    def apply(self) -> None:
        with self.g.inserting_before(self.node):
            user = self._part(True, with_bias=False)
            group = self._part(False, with_bias=True)
            total = self._call(aten.add.Tensor, (user, group))
        self.node.replace_all_uses_with(total)
        self.g.erase_node(self.node)

    def _part(self, want: bool, *, with_bias: bool) -> fx.Node:
        runs = _runs(self.user, want)
        xs = self._gather(self.x, self.dim, runs)
        t, args = self.node.target, self.node.args
        if t in _SUMS:
            return self._call(t, (xs, *args[1:]), dict(self.node.kwargs))
        w_dim = 1 if t is aten.linear.default else 0
        w = self._gather(args[1], w_dim, runs)
        if t is aten.linear.default:
            bias = args[2] if with_bias and len(args) > 2 else None
            return self._call(t, (xs, w, bias) if bias is not None else (xs, w))
        return self._call(t, (xs, w))

    def _gather(self, src: fx.Node, dim: int, runs: list[tuple[int, int]]) -> fx.Node:
        parts = [self._call(aten.slice.Tensor, (src, dim, lo, hi)) for lo, hi in runs]
        return parts[0] if len(parts) == 1 else self._call(aten.cat.default, (parts, dim))

    def _call(self, target, args, kwargs=None) -> fx.Node:
        n = self.g.call_function(target, tuple(args), kwargs or {})
        n.meta[PASS_KEY] = PASS_NAME
        for k in ("nn_module_stack", "stack_trace"):
            if k in self.node.meta:
                n.meta[k] = self.node.meta[k]
        vals = torch.utils._pytree.tree_map(
            lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, (tuple(args), kwargs or {})
        )
        with self.fake:
            n.meta["val"] = target(*vals[0], **vals[1])
        return n
