"""Execution forms of sparse per-token MoE expert banks, in standard ONNX ops.

    SparseMoEFormPass(form)   every bank found by moe_match.find_banks -> ``form``

Forms (all compute y[b, t] = sum_j gates[b,t,j] * FFN_{t, idx[b,t,j]}(x[b, t])):

* ``gather``  per (row, token, slot) gather of the selected expert's weight slices from
  tables ``[T*E, D, H]`` and a batched MatMul: cost follows k, not E; weight bytes moved
  per row, so it suits small batches (the user side at M=1).
* ``grouped`` rows grouped by expert: the (row, token, slot) assignments sorted by key
  t*E + e (TopK), counted per key (one ScatterElements add: a histogram), their rows
  gathered once and Split into T*E runs, each run through its expert's two 2-D GEMMs, the
  outputs concatenated and put back in (row, token, slot) order by one Gather through the
  inverse permutation (one ScatterElements), gated and summed over the k slots: cost follows
  k, each expert's weights read once per call, so it suits large batches (the group side at
  N candidates).
* ``padded``  rows grouped by expert as for ``grouped``, but scattered into a zero-padded
  [T*E, cap, D] batch (cap: this call's largest group) and run as ONE batched MatMul per
  layer: a few nodes whatever E is; cost follows the largest group, about k/E of dense
  at balanced routing. The padding rows are never read back.
* ``dense``   every expert on every token (broadcast MatMul over [T, E]), outputs weighted by
  the gates scattered into E slots: the fallback and the benchmark's baseline.
* ``fused``   ONE ``com.microsoft.MoE`` node per bank (ONNX Runtime's CPU kernel, not a standard
  op): the T*E (token, expert) pairs are its experts and the graph's own routing (TopK, the
  tie rule) picks them through its router input; no weight slice is copied (each selected
  expert's GEMM reads the weights in place), one node whatever E is. W8A16 lowers it to
  ``com.microsoft.QMoE`` (graph_passes.onnx.moe_quant). ONNX Runtime only (TensorRT refuses it).

Every node made carries ``ugsep.pass`` = the pass name and ``ugsep.moe`` = the bank name; the
gather form's weight Gathers also ``ugsep.moe_table`` = w1 / w2 (the quantizer's handle).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes.onnx._util import add_initializer, const_array, tag
from graph_passes.onnx.moe_match import Bank, find_banks

__all__ = ["FORMS", "FUSED_WEIGHTS", "SparseMoEFormPass", "bank_summary"]

FORMS = ("gather", "grouped", "padded", "dense", "fused")
_I64 = np.int64


class _Builder:
    """A tape bound to one graph and bank: ``op`` makes a node, ``const`` an initializer."""

    def __init__(self, graph: ir.Graph, bank: Bank, pass_name: str) -> None:
        self.graph, self.bank, self.pass_name = graph, bank, pass_name
        self.tape = ir.tape.Tape()

    def op(self, op_type: str, *inputs: ir.Value, **attrs) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attrs or None)

    def ops(self, op_type: str, *inputs: ir.Value, n: int, **attrs) -> list[ir.Value]:
        return list(self.tape.op_multi_out(op_type, list(inputs), attrs or None, num_outputs=n))

    def const(self, suffix: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, f"{self.bank.name}.{suffix}", np.asarray(array))

    def finish(self) -> list[ir.Node]:
        for node in self.tape.nodes:
            tag(node, self.pass_name, moe=self.bank.name)
        return list(self.tape.nodes)


def _gate_matrix(b: _Builder) -> tuple[ir.Value, ir.Value]:
    """(gates [B, T, E] with 0 for experts not selected, selection mask [B, T, E] as float)."""
    e = b.bank.w1.shape[1]
    onehot = b.op("Equal", b.op("Unsqueeze", b.bank.idx, b.const("ax_last", [-1])),
                  b.const("expert_ids", np.arange(e, dtype=_I64)))
    onehot = b.op("Cast", onehot, to=ir.DataType.FLOAT)  # [B, T, k, E]
    weighted = b.op("Mul", onehot, b.op("Unsqueeze", b.bank.gates, b.const("ax_last2", [-1])))
    gates = b.op("ReduceSum", weighted, b.const("ax2", [2]), keepdims=0)
    mask = b.op("ReduceMax", onehot, b.const("ax2b", [2]), keepdims=0)
    return gates, mask


def build_gather(b: _Builder) -> ir.Value:
    """Gather the k selected experts' slices per (row, token) and run them batched."""
    bank = b.bank
    t, e, d, h = bank.w1.shape
    flat = b.op("Add", bank.idx, b.const("offsets", (np.arange(t, dtype=_I64) * e)[:, None]))
    w1 = b.op("Gather", b.const("w1_table", bank.w1.reshape(t * e, d, h)), flat)
    w2 = b.op("Gather", b.const("w2_table", bank.w2.reshape(t * e, h, d)), flat)
    b1 = b.op("Gather", b.const("b1_table", bank.b1.reshape(t * e, 1, h)), flat)
    b2 = b.op("Gather", b.const("b2_table", bank.b2.reshape(t * e, 1, d)), flat)
    for v, role in ((w1, "w1"), (w2, "w2")):
        v.producer().metadata_props["ugsep.moe_table"] = role
    xs = b.op("Unsqueeze", bank.x, b.const("ax23", [2, 3]))  # [B, T, 1, 1, D]
    hid = b.op("Relu", b.op("Add", b.op("MatMul", xs, w1), b1))  # [B, T, k, 1, H]
    out = b.op("Add", b.op("MatMul", hid, w2), b2)  # [B, T, k, 1, D]
    g = b.op("Unsqueeze", bank.gates, b.const("ax34", [3, 4]))
    return b.op("ReduceSum", b.op("Mul", out, g), b.const("ax23s", [2, 3]), keepdims=0)


def build_dense(b: _Builder) -> ir.Value:
    """Every expert on every token; outputs weighted by the (mostly zero) gate matrix."""
    bank = b.bank
    gates, _ = _gate_matrix(b)
    xt = b.op("Unsqueeze", b.op("Transpose", bank.x, perm=[1, 0, 2]), b.const("ax1", [1]))
    hid = b.op("MatMul", xt, b.const("w1", bank.w1))  # [T, E, B, H]
    hid = b.op("Relu", b.op("Add", hid, b.const("b1", bank.b1[:, :, None, :])))
    out = b.op("Add", b.op("MatMul", hid, b.const("w2", bank.w2)), b.const("b2", bank.b2[:, :, None, :]))
    g = b.op("Unsqueeze", b.op("Transpose", gates, perm=[1, 2, 0]), b.const("ax_l", [-1]))
    y = b.op("ReduceSum", b.op("Mul", out, g), b.const("axE", [1]), keepdims=0)  # [T, B, D]
    return b.op("Transpose", y, perm=[1, 0, 2])


def _sorted_assignments(b: _Builder) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
    """The B*T*k (row, token, slot) assignments sorted by key t*E + e: (sorted keys, order,
    source row b*T + t of each sorted assignment, assignments per key [T*E])."""
    bank = b.bank
    t, e = bank.w1.shape[:2]
    flat = b.const("flat", np.array([-1], dtype=_I64))
    offsets = b.const("offsets", (np.arange(t, dtype=_I64) * e)[:, None])
    keys = b.op("Reshape", b.op("Add", bank.idx, offsets), flat)  # [n], n = B*T*k
    skeys, order = b.ops("TopK", keys, b.op("Shape", keys), n=2, largest=0, sorted=1)
    rows = b.op("Div", order, b.const("k", np.array(bank.top_k, dtype=_I64)))
    ones = b.op("ConstantOfShape", b.op("Shape", keys), value=ir.tensor(np.ones(1, _I64)))
    counts = b.op("ScatterElements", b.const("key_zeros", np.zeros(t * e, _I64)), keys, ones,
                  axis=0, reduction="add")  # a histogram: O(n), not an [n, T*E] one-hot
    return skeys, order, rows, counts


def _unsort_and_gate(b: _Builder, sorted_out: ir.Value, order: ir.Value) -> ir.Value:
    """Sorted expert outputs [n, D] back to (row, token, slot) order, gated, summed over the
    k slots: [B, T, D]. The inverse permutation is one ScatterElements, the un-sort one
    Gather (no zero-filled ScatterND with reduction)."""
    bank = b.bank
    d = bank.w1.shape[2]
    n = b.op("Squeeze", b.op("Shape", order), b.const("ax0q", [0]))
    pos = b.op("Range", b.const("zero", np.array(0, dtype=_I64)), n,
               b.const("one", np.array(1, dtype=_I64)))
    inverse = b.op("ScatterElements", order, order, pos, axis=0)  # inverse[order[j]] = j
    out = b.op("Gather", sorted_out, inverse, axis=0)  # [n, D], n = B*T*k in (b, t, j) order
    shape = b.op("Concat", b.op("Shape", bank.gates), b.const("d", np.array([d], dtype=_I64)),
                 axis=0)
    out = b.op("Reshape", out, shape)  # [B, T, k, D]
    if bank.top_k == 1:
        return b.op("Mul", b.op("Squeeze", out, b.const("ax2", [2])), bank.gates)
    gated = b.op("Mul", out, b.op("Unsqueeze", bank.gates, b.const("ax_g", [-1])))
    return b.op("ReduceSum", gated, b.const("ax2", [2]), keepdims=0)


def build_grouped(b: _Builder) -> ir.Value:
    """Rows grouped by expert: the B*T*k (row, token, slot) assignments sorted by key t*E + e,
    the rows gathered once, split into T*E runs, each run through its expert's two GEMMs,
    un-sorted by one Gather, gated and summed over the k slots."""
    bank = b.bank
    t, e, d, h = bank.w1.shape
    _, order, rows, counts = _sorted_assignments(b)
    x2 = b.op("Reshape", bank.x, b.const("rows_d", np.array([-1, d], dtype=_I64)))  # [B*T, D]
    parts = b.ops("Split", b.op("Gather", x2, rows, axis=0), counts, n=t * e, axis=0)
    outs = []
    for i, part in enumerate(parts):
        ti, ei = divmod(i, e)
        hid = b.op("MatMul", part, b.const(f"w1.t{ti}.e{ei}", bank.w1[ti, ei]))
        hid = b.op("Relu", b.op("Add", hid, b.const(f"b1.t{ti}.e{ei}", bank.b1[ti, ei])))
        outs.append(b.op("Add", b.op("MatMul", hid, b.const(f"w2.t{ti}.e{ei}", bank.w2[ti, ei])),
                         b.const(f"b2.t{ti}.e{ei}", bank.b2[ti, ei])))
    return _unsort_and_gate(b, b.op("Concat", *outs, axis=0), order)


def build_padded(b: _Builder) -> ir.Value:
    """Rows grouped by expert into a padded [T*E, cap, D] batch (cap = the largest group of
    this call), so every expert runs in ONE batched MatMul; padding rows are zeros and are
    never read back. Cost follows the largest group (about k/E of dense at balanced
    routing), with a handful of nodes whatever E is."""
    bank = b.bank
    t, e, d, h = bank.w1.shape
    te = t * e
    skeys, order, rows, counts = _sorted_assignments(b)
    x2 = b.op("Reshape", bank.x, b.const("rows_d", np.array([-1, d], dtype=_I64)))
    start = b.op("CumSum", counts, b.const("ax0s", np.array(0, dtype=_I64)), exclusive=1)
    cap = b.op("ReduceMax", counts, b.const("ax0m", [0]), keepdims=1)  # [1]
    i = b.op("Range", b.const("zero", np.array(0, dtype=_I64)),
             b.op("Squeeze", b.op("Shape", order), b.const("ax0q", [0])),
             b.const("one", np.array(1, dtype=_I64)))
    slot = b.op("Add", b.op("Mul", skeys, cap), b.op("Sub", i, b.op("Gather", start, skeys, axis=0)))
    slot = b.op("Unsqueeze", slot, b.const("ax_s", [-1]))
    d_shape = b.const("d", np.array([d], dtype=_I64))
    padded_rows = b.op("Mul", b.const("te", np.array([te], dtype=_I64)), cap)
    zeros = b.op("ConstantOfShape", b.op("Concat", padded_rows, d_shape, axis=0),
                 value=ir.tensor(np.zeros(1, np.float32)))
    x_pad = b.op("ScatterND", zeros, slot, b.op("Gather", x2, rows, axis=0))
    x3 = b.op("Reshape", x_pad, b.op("Concat", b.const("te1", np.array([te], dtype=_I64)), cap,
                                     d_shape, axis=0))
    hid = b.op("MatMul", x3, b.const("w1_bank", bank.w1.reshape(te, d, h)))
    hid = b.op("Relu", b.op("Add", hid, b.const("b1_bank", bank.b1.reshape(te, 1, h))))
    out = b.op("Add", b.op("MatMul", hid, b.const("w2_bank", bank.w2.reshape(te, h, d))),
               b.const("b2_bank", bank.b2.reshape(te, 1, d)))
    picked = b.op("GatherND", b.op("Reshape", out, b.const("rows_d2", np.array([-1, d], dtype=_I64))),
                  slot)
    return _unsort_and_gate(b, picked, order)


MS_DOMAIN = "com.microsoft"
FUSED_WEIGHTS = ("fused_w1", "fused_w2")  # the fused form's weights: <bank>.fused_w1 / .fused_w2
_GATE_FLOOR = -1e30  # log-gate floor: exp(floor - max) is exactly 0, never -inf (the unselected)


def build_fused(b: _Builder) -> ir.Value:
    """ONE ``com.microsoft.MoE`` node per bank (ONNX Runtime's CPU kernel: rows grouped by
    expert, one GEMM pair per non-empty expert, experts split across the intra-op threads).
    The (token, expert) pairs are its T*E experts; the graph's own routing picks them: the
    router input is log(gate) at the k selected flat ids t*E + e of each (row, token) and
    -inf elsewhere, so the kernel's top-k takes exactly those k and its normalised weights are
    gate / sum(gates); the output times sum(gates) is sum_j gate_j FFN_j(x)."""
    bank = b.bank
    t, e, d, h = bank.w1.shape
    te, k = t * e, bank.top_k
    flat = b.op("Add", bank.idx, b.const("offsets", (np.arange(t, dtype=_I64) * e)[:, None]))
    pairs = b.const("rows_k", np.array([-1, k], dtype=_I64))
    logg = b.op("Max", b.op("Log", bank.gates), b.const("gate_floor", np.array(_GATE_FLOOR, np.float32)))
    rows = b.op("Slice", b.op("Shape", b.op("Reshape", flat, pairs)), b.const("s0", [0]), b.const("s1", [1]))
    base = b.op("ConstantOfShape", b.op("Concat", rows, b.const("te", np.array([te], dtype=_I64)), axis=0),
                value=ir.tensor(np.full(1, -np.inf, np.float32)))
    router = b.op("ScatterElements", base, b.op("Reshape", flat, pairs), b.op("Reshape", logg, pairs), axis=1)
    x2 = b.op("Reshape", bank.x, b.const("rows_d", np.array([-1, d], dtype=_I64)))
    node = b.tape.op(
        "MoE",
        [x2, router, b.const(FUSED_WEIGHTS[0], np.ascontiguousarray(
            bank.w1.reshape(te, d, h).transpose(0, 2, 1))),  # [T*E, H, D]: (out, in) per expert
         b.const("fc1_bias", bank.b1.reshape(te, h)),
         b.const(FUSED_WEIGHTS[1], np.ascontiguousarray(bank.w2.reshape(te, h, d).transpose(0, 2, 1))),
         b.const("fc2_bias", bank.b2.reshape(te, d))],
        {"k": k, "activation_type": "relu", "normalize_routing_weights": 1},
        domain=MS_DOMAIN,
    )
    y = b.op("Reshape", node, b.op("Shape", bank.x))
    return b.op("Mul", y, b.op("ReduceSum", bank.gates, b.const("ax_last_k", [-1]), keepdims=1))


def _last_axis(node: ir.Node, rank: int | None) -> bool:
    """An ArgMax / ReduceMax over the last axis with keepdims=1 (ArgMax: first maximum)."""
    attrs = {k: v.value for k, v in node.attributes.items()}
    if attrs.get("keepdims", 1) != 1 or attrs.get("select_last_index", 0) != 0:
        return False
    if node.op_type == "ArgMax":
        axis = attrs.get("axis", 0)
    else:
        axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else attrs.get("axes")
        if axes is None or np.size(axes) != 1:
            return False
        axis = int(np.ravel(axes)[0])
    return axis == -1 or (rank is not None and axis == rank - 1)


def _max_of(value: ir.Value, rank: int | None) -> ir.Value | None:
    """The output of a last-axis ReduceMax(keepdims) of ``value``, if there is one."""
    for use in value.uses():
        n = use.node
        if n.op_type == "ReduceMax" and use.idx == 0 and _last_axis(n, rank):
            return n.outputs[0]
    return None


def _routing_rounds(bank: Bank) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(router logits, values, ids) of the student's top-k routing feeding ``bank``: k rounds of
    ArgMax and ReduceMax, each round masking the chosen expert to -inf (students.moe.route_topk),
    the rounds' maxima and ids concatenated on the last axis. None if ``bank.idx`` is not that."""
    k = bank.top_k
    cat = bank.idx.producer()
    ids = [bank.idx] if k == 1 else (list(cat.inputs) if cat is not None and cat.op_type == "Concat" else [])
    if len(ids) != k:
        return None
    rank = len(bank.idx.shape) if bank.idx.shape is not None else None
    argmaxes = [v.producer() for v in ids]
    if any(a is None or a.op_type != "ArgMax" or not _last_axis(a, rank) for a in argmaxes):
        return None
    for prev, cur in itertools.pairwise(argmaxes):  # cur reads prev's input, prev's pick masked
        where = cur.inputs[0].producer()
        if where is None or where.op_type != "Where" or where.inputs[2] is not prev.inputs[0]:
            return None
        eq, fill = where.inputs[0].producer(), const_array(where.inputs[1])
        if eq is None or eq.op_type != "Equal" or prev.outputs[0] not in eq.inputs:
            return None
        other = const_array(eq.inputs[1 - list(eq.inputs).index(prev.outputs[0])])
        if fill is None or fill.size != 1 or not np.isneginf(fill).all() or other is None:
            return None
        if not np.array_equal(np.ravel(other), np.arange(other.size)):
            return None
    maxes = [_max_of(a.inputs[0], rank) for a in argmaxes]
    if any(m is None for m in maxes):
        return None
    if k == 1:
        return argmaxes[0].inputs[0], maxes[0], bank.idx
    vcat = [u.node for u in maxes[0].uses() if u.node.op_type == "Concat"]
    if len(vcat) != 1 or list(vcat[0].inputs) != maxes or vcat[0].attributes["axis"].value not in (-1, rank - 1):
        return None
    if cat.attributes["axis"].value not in (-1, (rank or 0) - 1):
        return None
    return argmaxes[0].inputs[0], vcat[0].outputs[0], bank.idx


def fuse_routing(graph: ir.Graph, bank: Bank, pass_name: str) -> bool:
    """Replace the k ArgMax rounds of ``bank``'s routing by ONE TopK(k) on the router logits.

    ONNX TopK orders equal values by the lower index first, the tie rule of the rounds
    (ArgMax's first maximum): the same experts in the same order. The rounds' nodes, left
    without consumers, are removed by the pass."""
    found = _routing_rounds(bank)
    if found is None:
        return False
    logits, values, ids = found
    tape = ir.tape.Tape()
    k = add_initializer(graph, f"{bank.name}.top_k", np.array([bank.top_k], dtype=_I64))
    vals, idx = tape.op_multi_out("TopK", [logits, k], {"axis": -1, "largest": 1, "sorted": 1},
                                  num_outputs=2)
    for new, old in ((vals, values), (idx, ids)):
        new.shape, new.type = old.shape, old.type
    for node in tape.nodes:
        tag(node, pass_name, moe=bank.name)
    if logits.producer() is not None:
        graph.insert_after(logits.producer(), list(tape.nodes))
    else:
        graph.insert_before(next(iter(graph)), list(tape.nodes))
    values.replace_all_uses_with(vals)
    ids.replace_all_uses_with(idx)
    bank.idx = idx
    return True


_BUILD = {
    "gather": build_gather,
    "grouped": build_grouped,
    "padded": build_padded,
    "dense": build_dense,
    "fused": build_fused,
}


def bank_summary(bank: Bank) -> dict:
    """Sizes and parameter counts of a bank (for the manifest and ``ugsep inspect``)."""
    return {"name": bank.name, **bank.sizes, "params": bank.params()}


class SparseMoEFormPass(ir.passes.InPlacePass):
    """Rewrite every expert bank into ``form`` (one of FORMS); ``self.banks`` lists them.
    With ``fuse_routing`` (default) each bank's k ArgMax rounds become one TopK
    (``fuse_routing``; ``self.fused_routing`` counts them)."""

    def __init__(self, form: str, fuse_routing: bool = True) -> None:
        super().__init__()
        self.fuse_routing, self.fused_routing = fuse_routing, 0
        if form not in FORMS:
            raise ValueError(f"MoE form '{form}' is not one of {FORMS}")
        self.form = form
        self.banks: list[dict] = []
        self.refusals = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        banks, self.refusals = find_banks(model.graph)
        self.banks = [bank_summary(b) for b in banks]
        for bank in banks:
            if self.fuse_routing:
                self.fused_routing += fuse_routing(model.graph, bank, type(self).__name__)
            builder = _Builder(model.graph, bank, type(self).__name__)
            y = _BUILD[self.form](builder)
            model.graph.insert_before(bank.anchor, builder.finish())
            if self.form == "fused":
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            if bank.y in model.graph.outputs:  # the graph keeps its output's name
                name = bank.y.name
                bank.y.replace_all_uses_with(y, replace_graph_outputs=True)
                bank.y.name, y.name = f"{name}.replaced", name
            else:
                bank.y.replace_all_uses_with(y)
        if banks:
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.RemoveUnusedInitializersPass()(model) if hasattr(
                common_passes, "RemoveUnusedInitializersPass") else None
        return ir.passes.PassResult(model, bool(banks))
