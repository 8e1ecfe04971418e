"""The row-wise proof: does a node keep the rows of the batch dimension apart?

A user-side node may run once per user (and be gathered per candidate) only if
row b of its output depends on row b of its user-side inputs alone. We prove it
structurally, op by op, from an allow-list: every rule names which dims the op
touches and refuses when that includes the batch dim. The batch dim of a tensor
is the one dim whose size involves the batch symbol B; it may be folded with
static factors, size = outer * B * inner (nn.MultiheadAttention folds heads this
way), and views are checked to keep B a clean factor. Anything unlisted is
unproven and stays on the group side.

``prove(node, ctx)`` returns the (outer, inner) of the node's batch dim, or a
string saying why the node is not row-wise.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch
from torch import fx

from graph_passes.fx._base import batch_dims, batch_factor, sym_expr, tensor_val
from graph_passes.fx._ops import (
    _DEFAULT_DIM,
    ALONG_DIMS,
    ELEMENTWISE,
    LAST_DIMS_NORMS,
    MATMULS,
    PERMUTES,
    ROW_UNIFORM_FACTORIES,
    VIEWS,
)

aten = torch.ops.aten
Layout = tuple[int, int]
__all__ = [
    "ALONG_DIMS",
    "ELEMENTWISE",
    "LAST_DIMS_NORMS",
    "MATMULS",
    "PERMUTES",
    "ROW_UNIFORM_FACTORIES",
    "VIEWS",
    "ProofContext",
    "prove",
]


@dataclass
class ProofContext:
    """What a rule needs: the batch symbol, which nodes are user-side, their layouts."""

    s0: sympy.Symbol
    is_user: Callable[[fx.Node], bool]
    layout: dict[fx.Node, Layout]


def prove(node: fx.Node, ctx: ProofContext) -> Layout | str:
    """(outer, inner) of ``node``'s batch dim if it is row-wise, else why not."""
    if node.op != "call_function":
        return f"{node.op} nodes are not row-wise ops"
    if node.target is operator.getitem:
        return _carry(node, ctx, [node.args[0]])
    for check in (
        _try_elementwise,
        _try_along_dims,
        _try_view,
        _try_permute,
        _try_norm,
        _try_linear,
        _try_matmul,
        _try_embedding,
        _try_cat,
        _try_slice,
        _try_misc,
    ):
        res = check(node, ctx)
        if res is not None:
            return res
    return f"op {node.target} is not in the row-wise allow-list"


# -- helpers ---------------------------------------------------------------------------
def _user_tensors(node: fx.Node, ctx: ProofContext) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if ctx.is_user(a) and tensor_val(a) is not None]


def _bdim(n: fx.Node, ctx: ProofContext) -> int | None:
    dims = batch_dims(tensor_val(n), ctx.s0)
    return dims[0] if len(dims) == 1 else None


def _out_vals(node: fx.Node) -> list[torch.Tensor]:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def _out_ok(node: fx.Node, ctx: ProofContext) -> str | None:
    """Every tensor output has exactly one batch dim of size c*B."""
    for v in _out_vals(node):
        dims = batch_dims(v, ctx.s0)
        if len(dims) != 1 or batch_factor(v.shape[dims[0]], ctx.s0) is None:
            return f"its output shape {tuple(v.shape)} has no single batch dimension"
    return None if _out_vals(node) else "it has no tensor output"


def _carry(node: fx.Node, ctx: ProofContext, sources: list[fx.Node]) -> Layout | str:
    """Output keeps the (outer, inner) its user-side sources agree on."""
    bad = _out_ok(node, ctx)
    if bad:
        return bad
    layouts = {ctx.layout[s] for s in sources if s in ctx.layout}
    if len(layouts) != 1:
        return f"its user-side inputs fold the batch differently ({sorted(layouts)})"
    return layouts.pop()


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _aligned(n: fx.Node, out_rank: int, ctx: ProofContext) -> int | None:
    d = _bdim(n, ctx)
    return None if d is None else d + out_rank - tensor_val(n).dim()


# -- rules -----------------------------------------------------------------------------
def _try_elementwise(node, ctx):
    if node.target not in ELEMENTWISE:
        return None
    users = _user_tensors(node, ctx)
    out = _out_vals(node)
    if not out:
        return "it has no tensor output"
    rank = out[0].dim()
    want = _bdim_of_val(out[0], ctx)
    for u in users:
        if _aligned(u, rank, ctx) != want:
            return "broadcasting moves the batch dimension of a user-side input"
    for a in node.all_input_nodes:  # a constant may broadcast along B only with size 1
        v = tensor_val(a)
        if a in users or v is None or want is None:
            continue
        k = want - (rank - v.dim())
        if k >= 0 and not _is_uniform_factory(a) and v.shape[k] != 1:
            return f"operand {a.name} has size {v.shape[k]} along the batch dimension"
    if node.target is aten.glu.default:
        return _try_along_dims(node, ctx)
    return _carry(node, ctx, users)


def _bdim_of_val(v: torch.Tensor, ctx) -> int | None:
    dims = batch_dims(v, ctx.s0)
    return dims[0] if len(dims) == 1 else None


def _is_uniform_factory(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in ROW_UNIFORM_FACTORIES


def _dims_arg(node: fx.Node, idx: int):
    if len(node.args) > idx:
        return node.args[idx]
    key = "dims" if "dims" in node.kwargs else "dim"
    return node.kwargs.get(key, _DEFAULT_DIM.get(node.target, "all"))


def _try_along_dims(node, ctx):
    idx = ALONG_DIMS.get(node.target)
    if idx is None:
        return None
    src = node.args[0]
    if not ctx.is_user(src):
        return _carry(node, ctx, _user_tensors(node, ctx))
    dims = _dims_arg(node, idx)
    rank = tensor_val(src).dim()
    if dims is None or dims == "all" or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return "it works over all dimensions, including the batch"
    dims = [dims] if isinstance(dims, int) else list(dims)
    bd = _bdim(src, ctx)
    if bd is None or bd in [_norm(d, rank) for d in dims]:
        return f"it works along dim {dims}, the batch dimension (rows would mix)"
    if node.target in _INDEXED:
        index = node.args[2]
        if ctx.is_user(index) and node.target is aten.index_select.default:
            return "its index is user-side data"
        if ctx.is_user(index) and _bdim(index, ctx) != bd:
            return "its index does not share the batch dimension"
    return _carry(node, ctx, _user_tensors(node, ctx))


# ops whose index argument (args[2]) selects positions along ``dim`` within each row
_INDEXED = (
    aten.index_select.default,
    aten.gather.default,
    aten.scatter.src,
    aten.scatter.value,
    aten.scatter_add.default,
    aten.scatter_reduce.two,
)


def _try_view(node, ctx):
    if node.target not in VIEWS:
        return None
    src = node.args[0]
    bad = _out_ok(node, ctx)
    if bad:
        return bad
    vin, vout = tensor_val(src), tensor_val(node)
    din, dout = _bdim(src, ctx), _bdim_of_val(vout, ctx)
    outer_in, _inner_in = ctx.layout[src]
    prefix_in = [sym_expr(d) for d in vin.shape[:din]]
    prefix_out = [sym_expr(d) for d in vout.shape[:dout]]
    if any(not e.is_Integer for e in prefix_in + prefix_out):
        return "the dims in front of the batch dimension are not static"
    big_outer = math.prod(int(e) for e in prefix_in) * outer_in
    p_out = math.prod(int(e) for e in prefix_out)
    c_out = batch_factor(vout.shape[dout], ctx.s0)
    if big_outer % p_out or c_out % (big_outer // p_out):
        return (
            f"the view {tuple(vin.shape)} -> {tuple(vout.shape)} folds the batch "
            "dimension into another dimension"
        )
    outer = big_outer // p_out
    return (outer, c_out // outer)


def _try_permute(node, ctx):
    if node.target not in PERMUTES:
        return None
    return _carry(node, ctx, [node.args[0]])


def _try_norm(node, ctx):
    if node.target in LAST_DIMS_NORMS:
        src, shape = node.args[0], node.args[1]
        if not ctx.is_user(src):
            return _carry(node, ctx, _user_tensors(node, ctx))
        if _bdim(src, ctx) is None or _bdim(src, ctx) >= tensor_val(src).dim() - len(shape):
            return "it normalises over the batch dimension"
        if any(ctx.is_user(a) for a in node.args[2:4] if isinstance(a, fx.Node)):
            return "its weight or bias is user-side data"
        return _carry(node, ctx, [src])
    if node.target is aten._native_batch_norm_legit_no_training.default or (
        node.target is aten.batch_norm.default and not node.args[5]
    ):  # inference batch norm: a per-channel affine map
        src = node.args[0]
        if _bdim(src, ctx) == 1:
            return "its channel dimension is the batch dimension"
        return _carry(node, ctx, [src])
    if node.target in (
        aten.batch_norm.default,
        aten._native_batch_norm_legit.default,
        aten._native_batch_norm_legit_functional.default,
    ):
        return "training-mode batch norm normalises over the batch (rows would mix)"
    return None


def _try_linear(node, ctx):
    if node.target not in (aten.linear.default, aten.addmm.default):
        return None
    x, params = (
        (node.args[0], node.args[1:])
        if node.target is aten.linear.default
        else (node.args[1], (node.args[0], node.args[2]))
    )
    if any(isinstance(p, fx.Node) and ctx.is_user(p) for p in params):
        return "its weight is user-side data (it would contract over the batch)"
    if not ctx.is_user(x) or _bdim(x, ctx) is None or _bdim(x, ctx) == tensor_val(x).dim() - 1:
        return "it contracts over the batch dimension"
    if node.target is aten.addmm.default and _bdim(x, ctx) != 0:
        return "it contracts over the batch dimension"
    return _carry(node, ctx, [x])


def _try_matmul(node, ctx):
    if node.target not in MATMULS:
        return None
    a, b = node.args[-2], node.args[-1]
    rank = tensor_val(node).dim()
    where = []
    for n, pos in ((a, "a"), (b, "b")):
        if not (isinstance(n, fx.Node) and ctx.is_user(n)):
            continue
        r, d = tensor_val(n).dim(), _bdim(n, ctx)
        if r < 2 or d is None:
            return "a user-side vector operand is contracted over the batch"
        if (pos == "a" and d == r - 1) or (pos == "b" and d == r - 2):
            return "it contracts over the batch dimension"
        if pos == "a" and d == r - 2:
            where.append(rank - 2)
        elif pos == "b" and d == r - 1:
            where.append(rank - 1)
        else:
            where.append(d + rank - r)
    if node.target is aten.baddbmm.default and ctx.is_user(node.args[0]):
        where.append(_aligned(node.args[0], rank, ctx))
    if len(set(where)) != 1 or where[0] != _bdim_of_val(tensor_val(node), ctx):
        return "its operands' batch dimensions do not line up"
    return _carry(node, ctx, _user_tensors(node, ctx))


def _try_embedding(node, ctx):
    if node.target is not aten.embedding.default:
        return None
    if ctx.is_user(node.args[0]):
        return "its table is user-side data"
    return _carry(node, ctx, [node.args[1]])


def _try_cat(node, ctx):
    if node.target not in (aten.cat.default, aten.stack.default):
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = tensor_val(node)
    bd = _bdim_of_val(out, ctx)
    if bd is None:
        return "its output has no single batch dimension"
    d = _norm(dim, out.dim())
    if d == bd:
        return f"it concatenates along dim {dim}, the batch dimension"
    for p in parts:
        v = tensor_val(p)
        if v is not None and not (ctx.is_user(p) or _is_uniform_factory(p)) and v.numel() != 0:
            return f"operand {p.name} is not user-side and has no batch dimension"
    return _carry(node, ctx, [p for p in parts if ctx.is_user(p)])


def _try_slice(node, ctx):
    if node.target is not aten.slice.Tensor:
        return None
    src = node.args[0]
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4]
    if _norm(dim, tensor_val(src).dim()) == _bdim(src, ctx):
        full = (
            start in (0, None)
            and step in (1, None)
            and (end is None or (isinstance(end, int) and end >= 2**62))
        )
        if not full:
            return "it slices the batch dimension"
    return _carry(node, ctx, [src])


def _try_misc(node, ctx):
    t = node.target
    if t in (aten.pad.default, aten.constant_pad_nd.default):
        src, pad = node.args[0], node.args[1]
        rank, bd = tensor_val(src).dim(), _bdim(node.args[0], ctx)
        if bd is None or bd >= rank - len(pad) // 2:
            return "it pads the batch dimension"
        return _carry(node, ctx, [src])
    if t is aten.repeat.default:
        src, reps = node.args[0], node.args[1]
        bd = _aligned(src, len(reps), ctx)
        if bd is None or reps[bd] != 1:
            return "it repeats along the batch dimension"
        return _carry(node, ctx, [src])
    if t is aten.scaled_dot_product_attention.default:
        qkv = [a for a in node.args[:4] if isinstance(a, fx.Node) and ctx.is_user(a)]
        mask = node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node) and ctx.is_user(mask):
            qkv.append(mask)
        rank = tensor_val(node).dim()
        if any(_bdim(q, ctx) is None or _aligned(q, rank, ctx) >= rank - 2 for q in qkv):
            return "it attends over the batch dimension"
        if len({_aligned(q, rank, ctx) for q in qkv}) != 1:
            return "its operands' batch dimensions do not line up"
        return _carry(node, ctx, qkv)
    if t is aten.einsum.default:
        return _einsum(node, ctx)
    if t is aten.index.Tensor:
        src, idx = node.args[0], node.args[1]
        bd = _bdim(src, ctx)
        if any(isinstance(i, fx.Node) and ctx.is_user(i) for i in idx):
            return _index_by_rows(node, ctx, src, idx)
        if bd is None or (bd < len(idx) and idx[bd] is not None):
            return "it indexes the batch dimension"
        return _carry(node, ctx, [src])
    return None


def _einsum(node, ctx):
    eq, ops = node.args[0], node.args[1]
    if "..." in eq:
        return "einsum with ellipsis is not proven"
    ins, out = eq.replace(" ", "").split("->")
    letters = set()
    for spec, op in zip(ins.split(","), ops, strict=True):
        if ctx.is_user(op):
            d = _bdim(op, ctx)
            if d is None:
                return "a user-side operand has no single batch dimension"
            letters.add(spec[d])
    if len(letters) != 1 or letters.copy().pop() not in out:
        return "it contracts over the batch dimension"
    return _carry(node, ctx, [op for op in ops if ctx.is_user(op)])


def _index_by_rows(node, ctx, src, idx):
    """``table[ids]`` with a constant table and user-side ids (a lookup, like embedding):
    output row b reads only ids row b when the ids index the table's leading dims and
    share one batch layout (MoE expert weights gathered by a per-row top-k index)."""
    if ctx.is_user(src):
        return "its index tensors are user-side data and so is the indexed tensor"
    lead = [i for i in idx if i is not None]
    if len(lead) != len(idx) or not all(isinstance(i, fx.Node) and ctx.is_user(i) for i in lead):
        return "its user-side index tensors do not index the table's leading dims alone"
    shapes = {str(tuple(tensor_val(i).shape)) for i in lead}
    if len(shapes) != 1 or len({_bdim(i, ctx) for i in lead}) != 1:
        return "its user-side index tensors do not share one batch layout"
    return _carry(node, ctx, lead)
