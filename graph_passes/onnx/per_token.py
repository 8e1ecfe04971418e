"""Per-token matmuls (RankMixer-style FFN weights ``W[T, D, H]``) in the form ONNX Runtime runs fast.

    per_token_plan(einsum_node)          (token axis, weight stored [T, H, D]?) or why not
    PerTokenEinsumToMatMulPass           Einsum("btd,tdh->bth", x, W) with constant W
                                         ->  Transpose(x) -> MatMul(x[T,B,D], W[T,D,H]) -> Transpose
    optimize_inference(model)            the fp32 rewrites every exported stage gets (these,
                                         then hoist_gathered.HoistGatheredConcatPass)

ONNX Runtime CPU runs ``Einsum`` through a generic path (its own transposes and a batched
GEMM); the broadcast ``MatMul`` on a token-major activation is one MLAS batched GEMM, and
ORT's transpose optimizer folds the leading Transpose into it (FusedMatMul, transBatchA)
and pushes the trailing one through bias Add / Relu. On the bench RankMixer student the
group graph runs about 20% faster with it (measured; the Split + T MatMuls + Concat unroll
of ``canonicalize.UnrollBatchedMatMulPass`` was no faster than Einsum in fp32, the copies
cost what the GEMMs saved). The quantization canonicaliser shares ``per_token_plan`` and
unrolls the MatMul form this pass leaves.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes.onnx._util import Refusal, add_initializer, const_array, node_name, tag
from graph_passes.onnx.hoist_gathered import HoistGatheredConcatPass

log = logging.getLogger(__name__)


def per_token_plan(node: ir.Node) -> tuple[int, bool] | str:
    """(token axis of x and of the output, weight stored as [T, H, D]) for a per-token einsum.

    Accepts ``"b t d, t d h -> b t h"`` up to letters and token position, with the weight
    either ``[T, D, H]`` or ``[T, H, D]``; returns the reason as a string otherwise.
    """
    eq = node.attributes["equation"].value.replace(" ", "")
    try:
        lhs, out = eq.split("->")
        xs, ws = lhs.split(",")
    except ValueError:
        return f"einsum '{eq}' is not of the form 'x,w->y'"
    if len(xs) != 3 or len(ws) != 3 or len(out) != 3 or "." in eq:
        return f"einsum '{eq}' is not a rank-3 per-token matmul"
    t, rest = ws[0], ws[1:]
    contracted = [c for c in rest if c in xs and c not in out]
    kept = [c for c in rest if c in out and c not in xs]
    if t not in xs or t not in out or len(contracted) != 1 or len(kept) != 1:
        return f"einsum '{eq}' is not 'b t d, t d h -> b t h' up to letters"
    d, h = contracted[0], kept[0]
    if xs[-1] != d or out != xs.replace(d, h):
        return f"einsum '{eq}' would need a transpose of the activation"
    return xs.index(t), rest == h + d


class PerTokenEinsumToMatMulPass(ir.passes.InPlacePass):
    """Rewrite a per-token ``Einsum`` with a constant 3-D weight into a broadcast ``MatMul``.

    ``x[B, T, D]`` is transposed token-major (no Transpose when the token axis is already
    0), multiplied by ``W[T, D, H]`` (a ``[T, H, D]`` weight is stored transposed once) and
    transposed back: the same numbers, one batched GEMM. Einsums without a constant 3-D
    weight are not per-token layers and are skipped silently; per-token einsums of another
    shape are left alone with the reason in ``self.refusals``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[Refusal] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.refusals = []
        modified = False
        for node in list(model.graph):
            if node.op_type != "Einsum" or node.domain != "" or len(node.inputs) != 2:
                continue
            w = const_array(node.inputs[1])
            if w is None or w.ndim != 3:
                continue
            plan = per_token_plan(node)
            if isinstance(plan, str):
                self.refusals.append(Refusal(node_name(node), node.op_type, plan))
                log.info("PerTokenEinsumToMatMulPass: left %s alone: %s", node_name(node), plan)
                continue
            self._rewrite(model.graph, node, w, *plan)
            modified = True
        return ir.passes.PassResult(model, modified)

    def _rewrite(self, graph: ir.Graph, node: ir.Node, w: np.ndarray, axis: int, w_t: bool) -> None:
        name, base = self.__class__.__name__, node.name or node.outputs[0].name
        weight = node.inputs[1]
        if w_t:  # [T, H, D] -> [T, D, H], once, at export
            weight = add_initializer(
                graph, f"{weight.name}_kn", np.ascontiguousarray(w.swapaxes(1, 2))
            )
        perm = [axis] + [i for i in range(3) if i != axis]
        x, y, new_nodes = node.inputs[0], node.outputs[0], []
        if axis != 0:
            new_nodes.append(_transpose(x, perm, f"{base}_tmajor", name))
            x = new_nodes[-1].outputs[0]
        matmul = tag(ir.Node("", "MatMul", [x, weight], name=f"{base}_matmul"), name)
        new_nodes.append(matmul)
        out = matmul.outputs[0]
        _typed(out, y, perm)
        if axis != 0:
            new_nodes.append(_transpose(out, _inverse(perm), f"{base}_restore", name))
            out = new_nodes[-1].outputs[0]
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [y], [out])


def _inverse(perm: list[int]) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


def _transpose(x: ir.Value, perm: list[int], node_name: str, pass_name: str) -> ir.Node:
    node = ir.Node("", "Transpose", [x], attributes=[ir.AttrInt64s("perm", perm)], name=node_name)
    _typed(node.outputs[0], x, perm)
    return tag(node, pass_name)


def _typed(value: ir.Value, like: ir.Value, perm: list[int]) -> None:
    """Give ``value`` the type of ``like`` and its shape permuted by ``perm``.

    The equation fixes the rank (3) even when ``like`` has no shape; later passes (the
    quant unroll) need to know it.
    """
    value.type = like.type
    if like.shape is not None and len(like.shape) == len(perm):
        value.shape = ir.Shape([like.shape[i] for i in perm])
    else:
        value.shape = ir.Shape([None] * len(perm))


def optimize_inference(model: ir.Model) -> ir.passes.PassResult:
    """The rewrites every exported stage gets, at every precision (in place, in order).

    Numerics-preserving only (fp32 in, fp32 out, same reductions up to GEMM blocking), so
    full.onnx and the split stages are optimised alike and compared fairly: per-token
    Einsums to MatMul, then the layout ops after a Concat of gathered user rows run per part
    (``HoistGatheredConcatPass``: copies only; it finds nothing in full.onnx, which has no
    Gather of user rows). Dead code last (a ``[T, H, D]`` weight replaced by its transposed
    copy, a Gather whose part moved).
    """
    return ir.passes.Sequential(
        PerTokenEinsumToMatMulPass(),
        HoistGatheredConcatPass(),
        common_passes.RemoveUnusedNodesPass(),
    )(model)
