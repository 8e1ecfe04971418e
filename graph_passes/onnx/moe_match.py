"""Find the sparse per-token MoE expert banks of an exported graph (their gather form).

A bank computes, for x [B, T, D], expert ids idx [B, T, k] (int64) and gates [B, T, k]::

    y[b, t] = sum_j gates[b, t, j] * (relu(x[b, t] @ W1[t, e] + b1[t, e]) @ W2[t, e] + b2[t, e]),
              e = idx[b, t, j]

with constant stacked weights W1 [T, E, D, H], b1 [T, E, H], W2 [T, E, H, D], b2 [T, E, D].
torch.export + torch.onnx give it (students.moe.ExpertBank.gather) as::

    flat = Add(idx, offsets[T, 1])                   offsets[t] = t * E
    Gather(W1 table, flat) -> MatMul(Unsqueeze(x), .) -> Squeeze -> Add(Gather(b1, flat)) -> Relu
      -> Unsqueeze -> MatMul(., Gather(W2 table, flat)) -> Squeeze -> Add(Gather(b2, flat))
      -> Mul(., Unsqueeze(gates)) -> ReduceSum(axis 2) = y

(tables possibly behind a Reshape of the parameter). ``find_banks`` returns one ``Bank`` per
match, with the reason for every near-miss, so a rewrite can refuse by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graph_passes.onnx._util import Refusal, const_array, node_name

__all__ = ["Bank", "find_banks", "router_weights"]

_SHAPE_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Identity")


@dataclass
class Bank:
    """One matched expert bank: its graph inputs, output, weights and sizes."""

    name: str
    x: ir.Value
    idx: ir.Value
    gates: ir.Value
    y: ir.Value
    anchor: ir.Node  # the final ReduceSum: new nodes go before it
    w1: np.ndarray  # [T, E, D, H]
    b1: np.ndarray  # [T, E, H]
    w2: np.ndarray  # [T, E, H, D]
    b2: np.ndarray  # [T, E, D]
    top_k: int

    @property
    def sizes(self) -> dict[str, int]:
        t, e, d, h = self.w1.shape
        return {"tokens": t, "experts": e, "d_model": d, "hidden": h, "top_k": self.top_k}

    def params(self) -> dict[str, int]:
        """Total expert parameters and those one (row, token set) activates."""
        t, e, d, h = self.w1.shape
        per_expert = 2 * d * h + h + d
        return {"total": t * e * per_expert, "activated_per_row": t * self.top_k * per_expert}


def _resolve_const(value: ir.Value | None) -> np.ndarray | None:
    """A constant, seen through Reshape / Unsqueeze / Squeeze of a constant."""
    arr = const_array(value)
    if arr is not None or value is None:
        return arr
    node = value.producer()
    if node is None or node.op_type != "Reshape":
        return None
    base, shape = const_array(node.inputs[0]), const_array(node.inputs[1])
    if base is None or shape is None:
        return None
    return base.reshape([int(s) if s else base.shape[i] for i, s in enumerate(shape)])


def _through(value: ir.Value, ops=_SHAPE_OPS) -> ir.Value:
    """Walk back through shape-only ops to the value they reshape."""
    node = value.producer()
    while node is not None and node.op_type in ops:
        value = node.inputs[0]
        node = value.producer()
    return value


def _only_consumer(value: ir.Value, ops=_SHAPE_OPS) -> ir.Node | None:
    """The single consumer of ``value``, seen through single-consumer shape-only ops."""
    while True:
        uses = list(value.uses())
        if len(uses) != 1:
            return None
        node = uses[0].node
        if node.op_type not in ops:
            return node
        value = node.outputs[0]


def _other(node: ir.Node, value_node: ir.Node) -> ir.Value:
    """The input of binary ``node`` that does not come from ``value_node``."""
    a, b = node.inputs[0], node.inputs[1]
    return b if _through(a).producer() is value_node or a.producer() is value_node else a


def find_banks(graph: ir.Graph) -> tuple[list[Bank], list[Refusal]]:
    """Every expert bank in ``graph`` (gather form, as exported) and the near-misses."""
    by_index: dict[ir.Value, list[ir.Node]] = {}
    for node in graph:
        if node.op_type == "Gather" and node.domain == "" and len(node.inputs) == 2:
            flat = node.inputs[1]
            add = flat.producer() if flat is not None else None
            if add is not None and add.op_type == "Add" and _resolve_const(node.inputs[0]) is not None:
                by_index.setdefault(flat, []).append(node)
    banks, refusals = [], []
    for flat, gathers in by_index.items():
        res = _match(flat, gathers)
        if isinstance(res, Bank):
            banks.append(res)
        elif len(gathers) > 1:  # one table per index is a plain embedding lookup
            refusals.append(Refusal(node_name(gathers[0]), "Gather", res))
    return banks, refusals


def _match(flat: ir.Value, gathers: list[ir.Node]) -> Bank | str:
    if len(gathers) != 4:
        return f"{len(gathers)} constant tables gathered by one index, an expert bank has 4"
    matmuls = [(g, _only_consumer(g.outputs[0])) for g in gathers]
    mm = [(g, c) for g, c in matmuls if c is not None and c.op_type == "MatMul"]
    if len(mm) != 2:
        return "the gathered tables do not feed exactly two MatMuls"
    (g1, m1), (g2, m2) = sorted(mm, key=lambda p: _through(p[1].inputs[0]).producer() is not None
                                and _through(p[1].inputs[0]).producer().op_type == "Relu")
    relu = _through(m2.inputs[0]).producer()
    if relu is None or relu.op_type != "Relu":
        return "the second expert MatMul is not fed by a Relu"
    add1, add2 = _only_consumer(m1.outputs[0]), _only_consumer(m2.outputs[0])
    if add1 is None or add1.op_type != "Add" or add2 is None or add2.op_type != "Add":
        return "an expert MatMul is not followed by its bias Add"
    mul = _only_consumer(add2.outputs[0])
    red = _only_consumer(mul.outputs[0]) if mul is not None and mul.op_type == "Mul" else None
    if red is None or red.op_type != "ReduceSum":
        return "the expert outputs are not gated (Mul) and summed over the k slots (ReduceSum)"
    add = flat.producer()
    const_at = 1 if const_array(add.inputs[1]) is not None else 0
    idx, offsets = add.inputs[1 - const_at], const_array(add.inputs[const_at])
    w1, w2 = _resolve_const(g1.inputs[0]), _resolve_const(g2.inputs[0])
    b1, b2 = _gathered_table(_other(add1, m1), gathers), _gathered_table(_other(add2, m2), gathers)
    if any(a is None for a in (w1, w2, b1, b2)) or offsets.ndim != 2 or offsets.shape[1] != 1:
        return "the expert weights, biases or token offsets [T, 1] are not constants"
    t = offsets.shape[0]
    te = w1.shape[0]
    if te % t or b1.size % te or b2.size % te:
        return f"tables of {te} rows do not hold {t} tokens x E experts"
    e, h, d = te // t, b1.size // te, b2.size // te
    if w1.size != te * d * h or w2.size != te * d * h:
        return f"expert weights of {w1.size} / {w2.size} elements are not [T*E, D={d}, H={h}]"
    gates = _through(_other(mul, add2), ("Unsqueeze",))
    k = idx.shape[-1] if idx.shape is not None and isinstance(idx.shape[-1], int) else None
    if k is None:
        return "the number of selected experts (last dim of the expert ids) is not static"
    return Bank(
        name=_bank_name(g1),
        x=_through(m1.inputs[0], ("Unsqueeze",)),
        idx=idx,
        gates=gates,
        y=red.outputs[0],
        anchor=red,
        w1=w1.reshape(t, e, d, h).astype(np.float32),
        b1=b1.reshape(t, e, h).astype(np.float32),
        w2=w2.reshape(t, e, h, d).astype(np.float32),
        b2=b2.reshape(t, e, d).astype(np.float32),
        top_k=int(k),
    )


def _gathered_table(value: ir.Value, gathers: list[ir.Node]) -> np.ndarray | None:
    """The constant table behind ``value`` when one of the bank's Gathers produced it."""
    node = _through(value).producer()
    return _resolve_const(node.inputs[0]) if node in gathers else None


def _bank_name(gather_w1: ir.Node) -> str:
    """The module path of the bank: the W1 parameter's name without ``.w1`` (or the node)."""
    producer = gather_w1.inputs[0].producer()
    src = producer.inputs[0] if producer is not None and producer.op_type == "Reshape" else gather_w1.inputs[0]
    name = (src.name or "").removesuffix(".w1")
    if "." in name:  # the parameter's own path, e.g. layers.0.user_moe.experts
        return name
    # a folded constant ("view_3"): the module path torch.onnx recorded, else the node
    scope = gather_w1.metadata_props.get("namespace", "").rsplit("/", 2)
    return scope[-2].split(":")[0] if len(scope) >= 2 and scope[-2] else node_name(gather_w1)


def router_weights(graph: ir.Graph, hops: int = 6) -> set[str]:
    """Names of constant MatMul / Einsum weights whose output decides a routing (reaches an
    ArgMax or TopK within ``hops`` nodes): quantizing them could flip which experts run."""
    names: set[str] = set()
    for node in graph:
        if node.op_type not in ("ArgMax", "TopK"):
            continue
        frontier, seen = [node.inputs[0]], 0
        while frontier and seen < hops:
            nxt = []
            for v in frontier:
                p = v.producer() if v is not None else None
                if p is None:
                    continue
                if p.op_type in ("MatMul", "Einsum", "Gemm") and const_array(p.inputs[1]) is not None:
                    names.add(p.inputs[1].name)  # the router: stop on this path
                    continue
                nxt += [i for i in p.inputs if i is not None and const_array(i) is None]
            frontier, seen = nxt, seen + 1
    return names
