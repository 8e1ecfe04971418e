"""Canonicalise linear layers so every constant-weight matmul is a quantizable 2-D MatMul.

    GemmToMatMulPass            Gemm(A, B, C) with constant B  ->  MatMul(A, B') [+ Add(C')]
    UnrollPerTokenChainPass     a chain of per-token layers on x[B,T,D] (Transpose -> MatMul
                                W[T,D,H] -> Transpose -> Add/Mul const -> Relu -> ... as
                                optimize_inference leaves a per-token FFN)  ->  one Split of
                                x[B,T*D], per token the whole chain on [B,D] 2-D, one Concat
    UnrollBatchedMatMulPass     the fallback for a lone MatMul(x[T,B,D], W[T,D,H]) with
                                constant W  ->  Split + T MatMuls on W[t] + Concat
    canonicalize_linear(model)  constant folding, the rewrites above, dead-code removal

Why the chain form (measured, benchmarks/results/bench_quant.json and the note in
UnrollPerTokenChainPass): unrolling each per-token MatMul on its own costs a Split, a Concat
and the two Transposes ORT could otherwise fold, per layer; on the bench RankMixer that made
the canonical fp32 graphs 23-31% slower than the graphs as exported, more than int8 weights
gained. Unrolled once per chain, a per-token FFN is T independent 2-D chains whose bias Add
folds into MatMulNBits.

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
from graph_passes.onnx.per_token import PerTokenEinsumToMatMulPass, per_token_plan

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

    def __init__(
        self, max_tokens: int = 64, min_elements: int = 0, keep: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        self.max_tokens, self.min_elements, self.keep = max_tokens, min_elements, keep
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
            if w is None or w.ndim != 3 or w[0].size < self.min_elements:
                continue  # not a batched constant weight (or too small to quantize): not a refusal
            if node.inputs[1].name in self.keep:
                continue  # kept in float by the selection: the batched form is faster
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


_SWAP = [1, 0, 2]  # [B, T, F] <-> [T, B, F]
_UNARY = ("Relu", "Sigmoid", "Tanh")


class UnrollPerTokenChainPass(ir.passes.InPlacePass):
    """Unroll a chain of per-token ops on ``x[B, T, D]`` into T independent 2-D chains.

    The chain starts at ``Transpose<perm=[1,0,2]>(x)`` feeding a per-token ``MatMul`` with a
    constant ``W[T, D, H]`` and follows single-use values through further transposes
    ``[1,0,2]``, per-token MatMuls, ``Add``/``Mul`` with a constant that broadcasts per token
    (a bias ``[T, H]``, ``[H]``, ``[T, 1, H]``...) and ``Relu``/``Sigmoid``/``Tanh``; it ends
    at the last value in ``[B, T, F]`` layout. That becomes::

        Reshape(x, [0, -1]) -> Split(axis=1, T x D) -> per token t: the chain on [B, D] with
        W[t] ("<weight>.t<t>", 2-D), bias[t]... -> Concat(axis=1) -> Reshape([0, T, F])

    No transposes are left, one Split and one Concat per chain (not per layer), and each
    token's MatMul is followed by its own bias Add, which ``LowerToMatMulNBitsPass`` folds
    into MatMulNBits. Measured on a 4-block, T=8, 128->512->128 per-token FFN (ORT CPU,
    2 threads, MatMulNBits int8 accuracy_level=4): 0.55x the fp32 broadcast-MatMul latency
    at batch 1 and 0.90-1.02x at batch 512, against 0.60-0.62x and 1.21x for the per-layer
    Split/Concat unroll. Chains it cannot take are left for ``UnrollBatchedMatMulPass``.
    """

    def __init__(
        self, max_tokens: int = 64, min_elements: int = 0, keep: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        self.max_tokens, self.min_elements, self.keep = max_tokens, min_elements, keep
        self.refusals: list[Refusal] = []
        self.chains: list[list[str]] = []  # node names of each chain unrolled

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.refusals, self.chains = [], []
        for node in list(model.graph):
            if node.graph is None or not _is_swap(node):
                continue
            plan = self._walk(node)
            if isinstance(plan, str):
                if plan:
                    self.refusals.append(Refusal(node_name(node), node.op_type, plan))
                    log.info("UnrollPerTokenChainPass: left %s alone: %s", node_name(node), plan)
                continue
            self._unroll(model.graph, node, *plan)
        return ir.passes.PassResult(model, bool(self.chains))

    def _walk(self, start: ir.Node):
        """(steps, tokens, width in, end index) of the chain from ``start``, or why not ('' = no chain)."""
        x = start.inputs[0]
        first = _single_use(start.outputs[0])
        w0 = (
            const_array(first.inputs[1])
            if first is not None and first.op_type == "MatMul"
            else None
        )
        if first is None or first.domain != "" or w0 is None or w0.ndim != 3:
            return ""  # not the start of a per-token chain
        tokens, width = w0.shape[0], w0.shape[1]
        if w0[0].size < self.min_elements:
            return ""  # too small to quantize (min_elements): the batched form is faster in fp32
        if x.shape is None or len(x.shape) != 3 or x.shape[1] != tokens or x.shape[2] != width:
            return (
                f"activation '{x.name}' is not known to be [B, {tokens}, {width}] (shape {x.shape})"
            )
        if tokens > self.max_tokens:
            return f"{tokens} tokens exceed max_tokens={self.max_tokens}"
        steps: list[tuple[ir.Node, str, object, str]] = [(start, "swap", None, "T")]
        layout, value, f = "T", start.outputs[0], width
        while (node := _single_use(value)) is not None and node.domain == "":
            step = self._step(node, value, layout, tokens, f)
            if step is None:
                break
            kind, data = step
            if kind == "swap":
                layout = "B" if layout == "T" else "T"
            elif kind == "matmul":
                f = data.shape[2]
            steps.append((node, kind, data, layout))
            value = node.outputs[0]
        weights = {node.inputs[1].name for node, kind, _, _ in steps if kind == "matmul"}
        if weights <= self.keep:
            return ""  # every weight of the chain stays float (keep): no reason to unroll
        ends = [
            i
            for i, s in enumerate(steps)
            if s[3] == "B" and any(k == "matmul" for _, k, _, _ in steps[: i + 1])
        ]
        if not ends:
            return "the per-token chain does not come back to [B, T, F] layout"
        return steps[: ends[-1] + 1], tokens, width

    @staticmethod
    def _step(node: ir.Node, value: ir.Value, layout: str, tokens: int, f: int):
        """(kind, data) if ``node`` (consuming ``value``) extends the chain, else None."""
        if _is_swap(node):
            return "swap", None
        if node.op_type in _UNARY and len(node.inputs) == 1:
            return node.op_type, None
        if node.op_type == "MatMul" and layout == "T" and node.inputs[0] is value:
            w = const_array(node.inputs[1])
            if (
                w is not None
                and w.ndim == 3
                and w.shape[:2] == (tokens, f)
                and w.dtype == np.float32
            ):
                return "matmul", w
            return None
        if node.op_type in ("Add", "Mul") and len(node.inputs) == 2:
            other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
            c = const_array(other)
            if c is None or c.ndim > 3 or other is value:
                return None
            full = (1, tokens, f) if layout == "B" else (tokens, 1, f)
            try:
                per = np.broadcast_to(c.reshape((1,) * (3 - c.ndim) + c.shape), full)
            except ValueError:
                return None
            if np.broadcast_shapes(c.reshape((1,) * (3 - c.ndim) + c.shape).shape, full) != full:
                return None
            slices = [
                np.ascontiguousarray(per[0, t] if layout == "B" else per[t, 0])
                for t in range(tokens)
            ]
            return node.op_type, (other.name or node_name(node), slices)
        return None

    def _unroll(self, graph: ir.Graph, start: ir.Node, steps, tokens: int, width: int) -> None:
        name = self.__class__.__name__
        chain_nodes = [s[0] for s in steps]
        base = node_name(steps[1][0])
        x, old_out = start.inputs[0], steps[-1][0].outputs[0]
        flat_shape = add_initializer(graph, f"{base}_flat", np.array([0, -1], dtype=np.int64))
        sizes = add_initializer(graph, f"{base}_split", np.full(tokens, width, dtype=np.int64))
        flat = tag(ir.Node("", "Reshape", [x, flat_shape], name=f"{base}_flat"), name)
        split = ir.Node(
            "",
            "Split",
            [flat.outputs[0], sizes],
            attributes=[ir.AttrInt64("axis", 1)],
            num_outputs=tokens,
            name=f"{base}_split",
        )
        new_nodes, pieces, f = [flat, tag(split, name)], [], width
        for t in range(tokens):
            v, f = split.outputs[t], width
            for node, kind, data, _ in steps:
                if kind == "swap":
                    continue
                if kind == "matmul":
                    w_name = f"{node.inputs[1].name}.t{t}"  # layer names in reports: "ffn.w1.t3"
                    w = add_initializer(graph, w_name, np.ascontiguousarray(data[t]))
                    new = ir.Node("", "MatMul", [v, w], name=f"{node_name(node)}_tok{t}")
                    f = data.shape[2]
                elif kind in ("Add", "Mul"):
                    c = add_initializer(graph, f"{data[0]}.t{t}", data[1][t])
                    new = ir.Node("", kind, [v, c], name=f"{node_name(node)}_tok{t}")
                else:
                    new = ir.Node("", kind, [v], name=f"{node_name(node)}_tok{t}")
                new_nodes.append(tag(new, name, token=t))
                v = new.outputs[0]
            pieces.append(v)
        cat = ir.Node(
            "", "Concat", pieces, attributes=[ir.AttrInt64("axis", 1)], name=f"{base}_cat"
        )
        shape = add_initializer(graph, f"{base}_unflat", np.array([0, tokens, f], dtype=np.int64))
        back = ir.Node("", "Reshape", [cat.outputs[0], shape], name=f"{base}_unflat")
        new_nodes += [tag(cat, name), tag(back, name)]
        ir.convenience.replace_nodes_and_values(
            graph, start, chain_nodes, new_nodes, [old_out], [back.outputs[0]]
        )
        self.chains.append([node_name(n) for n in chain_nodes])


def _is_swap(node: ir.Node) -> bool:
    if node.op_type != "Transpose" or node.domain != "":
        return False
    perm = node.attributes.get("perm")
    return perm is not None and list(perm.value) == _SWAP


def _single_use(value: ir.Value) -> ir.Node | None:
    """The one node using ``value`` (None if several, none, or it is a graph output)."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


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


def canonicalize_linear(
    model: ir.Model,
    *,
    unroll_batched: bool = True,
    unroll_min_elements: int = 0,
    keep_batched: frozenset[str] = frozenset(),
) -> ir.passes.PassResult:
    """Fold constants, canonicalise linear layers, remove dead code (in place, one place in order).

    Order: folding first exposes constant weights hidden behind Transpose/Reshape/Constant
    nodes; the rewrites then see plain constants; dead code (old weights, folded chains) last.
    Per-token weights whose slices ``W[t]`` have fewer than ``unroll_min_elements`` elements
    are not unrolled (they will not be quantized, and the batched form is faster in fp32),
    nor are the per-token weights named in ``keep_batched`` (kept in float by the selection).
    """
    from onnxscript.optimizer._constant_folding import FoldConstantsPass

    passes: list[ir.passes.PassBase] = [
        FoldConstantsPass(
            shape_inference=True, input_size_limit=1 << 24, output_size_limit=1 << 24
        ),
        GemmToMatMulPass(),
    ]
    if unroll_batched:
        # einsums first in the MatMul form optimize_inference gives every exported stage
        # (stages that skipped it, tests), then whole chains, then lone per-token MatMuls
        passes += [
            PerTokenEinsumToMatMulPass(),
            UnrollPerTokenChainPass(min_elements=unroll_min_elements, keep=keep_batched),
            UnrollBatchedMatMulPass(min_elements=unroll_min_elements, keep=keep_batched),
        ]
    passes += [
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
        common_passes.RemoveUnusedOpsetsPass(),
    ]
    return ir.passes.Sequential(*passes)(model)
