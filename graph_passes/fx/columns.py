"""Column provenance: which sides (user / group columns) every element of a tensor depends on.

A CTR library feeds one tensor ``X`` of shape (B, C) whose columns mix user and candidate
fields (the spec's ``columns``). To split such a model by column, every tensor derived
from ``X`` carries a *mask*: an int64 tensor of its per-row shape whose elements hold
bit 1 (depends on a user column) and bit 2 (depends on a group column); 0 is constant.

- structural ops (slice, select, index_select / gather / index with constant indices,
  cat / stack, views, permutes, expand, copies, split) are *run on the masks* at batch
  size 1, so provenance follows the data exactly;
- elementwise ops OR their inputs' masks (broadcast); an embedding lookup spreads each
  id's mask over its embedding vector;
- anything else (matmul, reductions, ...) ORs every bit of every input into every element.

A node whose mask is all user is user-side (the cut hoists it); one whose every element
reads a group column is group-side; in between it stays ``mixed`` and is tracked on.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from graph_passes.fx._base import batch_factor, sym_expr, tensor_val
from graph_passes.fx._ops import ELEMENTWISE, PERMUTES, VIEWS

aten = torch.ops.aten
USER, GROUP = 1, 2
STRUCTURAL = (
    VIEWS
    | PERMUTES
    | {
        aten.slice.Tensor,
        aten.select.int,
        aten.index_select.default,
        aten.gather.default,
        aten.index.Tensor,
        aten.cat.default,
        aten.stack.default,
        aten.expand.default,
        aten.repeat.default,
        aten.narrow.default,
        aten.clone.default,
        aten.contiguous.default,
        aten.alias.default,
        aten.detach.default,
        aten._to_copy.default,
        aten.to.dtype,
        aten.lift_fresh_copy.default,
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.chunk.default,
        aten.unbind.int,
        aten.flatten.using_ints,
    }
)
_INDEX_ARGS = {aten.index_select.default: 2, aten.gather.default: 2}


def input_mask(shape: tuple[int, ...], user_columns: set[int]) -> torch.Tensor:
    """The mask of a mixed input: its last dim's user columns USER, the others GROUP."""
    mask = torch.full((1, *shape), GROUP, dtype=torch.int64)
    for c in user_columns:
        mask[..., c] = USER
    return mask


class ColumnTracker:
    """Computes masks node by node; ``value_of`` gives constant tensors (index arguments)."""

    def __init__(self, s0, value_of) -> None:
        self.s0 = s0
        self.value_of = value_of
        self.masks: dict[fx.Node, Any] = {}

    def side_of(self, node: fx.Node, sides: dict[fx.Node, str]) -> str:
        """user / group / mixed for a call node reading at least one mixed input."""
        mask = self._mask(node, sides)
        if mask is None or not _batch_leading(node, self.s0):
            return "group"
        self.masks[node] = mask
        flat = torch.cat([m.reshape(-1) for m in _tensors(mask)]) if _tensors(mask) else None
        if flat is None or flat.numel() == 0 or bool((flat == 0).all()):
            return "group"
        if bool(((flat & GROUP) == 0).all()):
            return "user"
        if bool(((flat & GROUP) != 0).all()):
            return "group"
        return "mixed"

    def _mask(self, node: fx.Node, sides: dict[fx.Node, str]) -> Any:
        t = node.target
        if t is operator.getitem:
            src = self.masks.get(node.args[0])
            return src[node.args[1]] if isinstance(src, (list, tuple)) else None
        try:
            if t in STRUCTURAL:
                return self._run(node, sides)
            if t is aten.embedding.default:
                ids = self._arg_mask(node.args[1], sides)
                return ids.unsqueeze(-1).expand(*ids.shape, tensor_val(node).shape[-1]).clone()
            ins = [self._arg_mask(a, sides) for a in node.all_input_nodes]
            ins = [m for m in ins if isinstance(m, torch.Tensor)]
            if t in ELEMENTWISE:
                out = ins[0]
                for m in ins[1:]:
                    a, b = torch.broadcast_tensors(out, m)
                    out = a | b
                return out.expand(self._shape(node)).clone()
            bits = 0
            for m in ins:
                bits |= _or_all(m)
            return torch.full(self._shape(node), bits, dtype=torch.int64)
        except Exception:  # noqa: BLE001 - an op the masks cannot follow: group, as before
            return None

    def _run(self, node: fx.Node, sides: dict[fx.Node, str]) -> Any:
        index_pos = _INDEX_ARGS.get(node.target)

        def sub(a: Any, pos: int | None = None) -> Any:
            if isinstance(a, fx.Node):
                if pos is not None and pos == index_pos:
                    return self._const(a, sides)
                if node.target is aten.index.Tensor and pos is None:
                    return self._const(a, sides)  # an index tensor inside the indices list
                return self._arg_mask(a, sides)
            return _at_batch_1(a, self.s0)

        args = [
            sub(a, i) if isinstance(a, fx.Node) else pytree.tree_map(sub, a)
            for i, a in enumerate(node.args)
        ]
        kwargs = {k: pytree.tree_map(sub, v) for k, v in node.kwargs.items()}
        kwargs.pop("dtype", None)
        if node.target in (aten._to_copy.default, aten.to.dtype):
            return args[0].clone()
        out = node.target(*args, **kwargs)
        return [o.long() for o in out] if isinstance(out, (list, tuple)) else out.long()

    def _arg_mask(self, a: fx.Node, sides: dict[fx.Node, str]) -> Any:
        if a in self.masks:
            return self.masks[a]
        val = a.meta.get("val")
        if isinstance(val, torch.SymInt) or not isinstance(val, torch.Tensor):
            return _at_batch_1(val, self.s0)
        side = sides.get(a)
        if side == "user":
            return torch.full(self._shape(a), USER, dtype=torch.int64)
        if side == "group":
            return torch.full(self._shape(a), GROUP, dtype=torch.int64)
        return torch.zeros(self._shape(a), dtype=torch.int64)  # a constant

    def _const(self, a: fx.Node, sides: dict[fx.Node, str]) -> torch.Tensor:
        if sides.get(a) != "const":
            raise ValueError(f"index {a.name} is data-dependent")
        return self.value_of(a)

    def _shape(self, node: fx.Node) -> list[int]:
        return [int(sym_expr(d).subs(self.s0, 1)) for d in tensor_val(node).shape]


def _or_all(m: torch.Tensor) -> int:
    bits = 0
    for b in (USER, GROUP):
        if bool(((m & b) != 0).any()):
            bits |= b
    return bits


def _tensors(mask: Any) -> list[torch.Tensor]:
    return [m for m in (mask if isinstance(mask, (list, tuple)) else [mask]) if isinstance(m, torch.Tensor)]


def _at_batch_1(a: Any, s0) -> Any:
    if isinstance(a, torch.SymInt):
        return int(sym_expr(a).subs(s0, 1))
    return a


def _batch_leading(node: fx.Node, s0) -> bool:
    """Every tensor output keeps the batch as dim 0 (factor 1) and nowhere else."""
    val = node.meta.get("val")
    vals = [v for v in (val if isinstance(val, (list, tuple)) else [val]) if isinstance(v, torch.Tensor)]
    for v in vals:
        if v.dim() == 0 or batch_factor(v.shape[0], s0) != 1:
            return False
        if any(s0 in sym_expr(d).free_symbols for d in v.shape[1:]):
            return False
    return bool(vals)
