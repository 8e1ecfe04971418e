"""Layout ops after a Concat of gathered user rows, run per part (the user part before its Gather).

    HoistGatheredConcatPass     Concat([Gather(U, idx, axis=0), C, ...], axis=c)
                                  -> Reshape / Slice / Transpose chain
                                ==  Concat([Gather(chain(U), idx), chain(C), ...], axis=c')

A split group graph gets each user boundary tensor ``U[M, ...]`` and broadcasts it to the
candidates' rows with ``Gather(U, user_index)``. RankMixer's token mixing then concatenates the
user tokens with the candidate tokens (``[N, 2T, D]``), reshapes, slices the heads the group side
keeps and transposes: three copies of ``N`` rows of which half is the same user's data repeated.
Every op of that chain is row-wise and keeps the concat axis apart, so it distributes over the
Concat: the user part runs on its ``M`` rows (one per distinct user) before it is gathered, the
candidate part runs on half the bytes, and the Concat moves to the end of the chain (on the
smaller, sliced tensor). The same numbers (copies only, no arithmetic), fewer bytes moved; on the
bench RankMixer group graph at 200 candidates the mixing's Gather + Concat + Slice + Transpose
cost about half as much; the whole group graph 0.94x at N = 200 (docs/split.md).

An op is pushed through the Concat only when, with the concat axis ``c`` (never 0, the row axis):
Reshape has a constant target of the form ``[-1, ...]`` (or ``[0, ...]`` without allowzero) that
keeps axes ``1..c`` as they are (so it only reshapes the trailing axes of each part); Slice has
constant starts/ends/axes/steps on axes other than 0 and ``c``; Transpose keeps axis 0 first.
Every value of the chain must have a single consumer and not be a graph output. Shapes must be
static apart from the row axis. Anything else ends the chain where it is.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graph_passes.onnx._util import add_initializer, const_array, tag

log = logging.getLogger(__name__)


def _static_tail(value: ir.Value) -> list[int] | None:
    """The dims of ``value`` after the row axis, when they are all known integers."""
    shape = value.shape
    if shape is None or len(shape) < 2:
        return None
    tail = [d for d in shape[1:]]
    if not all(isinstance(d, int) for d in tail):
        return None
    return [int(d) for d in tail]


def _single_use(value: ir.Value, graph: ir.Graph) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value in graph.outputs:
        return None
    return uses[0][0]


class _Step:
    """One op of the chain: how to apply it to a part of ``size`` along the concat axis."""

    def __init__(self, node: ir.Node, axis_in: int, axis_out: int, reshape: list[int] | None = None):
        self.node, self.axis_in, self.axis_out, self.reshape = node, axis_in, axis_out, reshape


def _plan_step(node: ir.Node, axis: int, in_tail: list[int]) -> _Step | None:
    """How ``node`` (consuming the chain value, concat on ``axis``) distributes, or None."""
    if node.domain != "":
        return None
    if node.op_type == "Reshape":
        target = const_array(node.inputs[1])
        if target is None or target.ndim != 1 or len(target) < axis + 1:
            return None
        allowzero = node.attributes.get("allowzero")
        first = int(target[0])
        if not (first == -1 or (first == 0 and (allowzero is None or allowzero.value == 0))):
            return None
        tail = [int(t) for t in target[1:]]
        if any(t <= 0 for t in tail) or int(np.prod(tail)) != int(np.prod(in_tail)):
            return None
        if tail[:axis] != in_tail[:axis]:  # axes 1..c kept: only the trailing axes are reshaped
            return None
        return _Step(node, axis, axis, reshape=[-1, *tail])
    if node.op_type == "Slice":
        if len(node.inputs) < 4 or any(v is None for v in node.inputs[3:]):
            return None
        consts = [const_array(v) for v in node.inputs[1:]]
        if any(c is None for c in consts):
            return None
        rank = len(in_tail) + 1
        axes = [int(a) % rank for a in consts[2]]
        if 0 in axes or axis in axes:
            return None
        return _Step(node, axis, axis)
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        if perm is None or perm.value[0] != 0:
            return None
        return _Step(node, axis, list(perm.value).index(axis))
    return None


def _out_tail(step: _Step, in_tail: list[int]) -> list[int] | None:
    """The static tail shape after ``step`` for an input of ``in_tail``."""
    node = step.node
    if node.op_type == "Reshape":
        return step.reshape[1:]
    if node.op_type == "Transpose":
        perm = list(node.attributes["perm"].value)
        return [in_tail[p - 1] for p in perm[1:]]
    # Slice: numpy's slicing of a dummy shape gives the sizes
    starts, ends, axes, *steps = (const_array(v) for v in node.inputs[1:])
    steps = steps[0] if steps else np.ones_like(starts)
    rank = len(in_tail) + 1
    index = [slice(None)] * rank
    for s, e, a, k in zip(starts, ends, axes, steps, strict=True):
        index[int(a) % rank] = slice(int(s), int(e), int(k))
    return list(np.empty([1, *in_tail], dtype=np.bool_)[tuple(index)].shape[1:])


class HoistGatheredConcatPass(ir.passes.InPlacePass):
    """Run the Reshape / Slice / Transpose chain after a Concat of gathered rows per part,
    each gathered part on its source rows before the Gather (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type == "Concat" and node.domain == "" and node.graph is model.graph:
                modified |= self._rewrite(model.graph, node)
        return ir.passes.PassResult(model, modified)

    def _rewrite(self, graph: ir.Graph, concat: ir.Node) -> bool:
        out = concat.outputs[0]
        tail = _static_tail(out)
        if tail is None:
            return False
        axis = concat.attributes["axis"].value % (len(tail) + 1)
        parts = list(concat.inputs)
        part_tails = [_static_tail(p) if p is not None else None for p in parts]
        if axis == 0 or any(t is None or len(t) != len(tail) for t in part_tails):
            return False
        gathered = [_gather_source(p) for p in parts]
        if not any(g is not None for g in gathered):
            return False
        # walk the chain
        steps, value, ax, cur_tail = [], out, axis, tail
        while (user := _single_use(value, graph)) is not None and user.inputs[0] is value:
            step = _plan_step(user, ax, cur_tail)
            if step is None:
                break
            new_tail = _out_tail(step, cur_tail)
            if new_tail is None:
                break
            steps.append(step)
            value, ax, cur_tail = user.outputs[0], step.axis_out, new_tail
        while steps and steps[-1].node.op_type == "Reshape":  # a trailing reshape stays after the Concat
            steps.pop()
        if not any(s.node.op_type in ("Slice", "Transpose") for s in steps):
            return False
        last = steps[-1].node.outputs[0]
        name = self.__class__.__name__
        new_nodes: list[ir.Node] = []
        new_parts: list[ir.Value] = []
        for i, (part, ptail, gather) in enumerate(zip(parts, part_tails, gathered, strict=True)):
            src = gather.inputs[0] if gather is not None else part
            x = src
            size = ptail[axis - 1]
            for k, step in enumerate(steps):
                x = self._apply(graph, step, x, size, f"{concat.name}_p{i}_{k}", name, new_nodes)
            if gather is not None:
                g = ir.Node("", "Gather", [x, gather.inputs[1]], attributes=[ir.AttrInt64("axis", 0)],
                            name=f"{concat.name}_p{i}_gather")
                new_nodes.append(tag(g, name))
                x = g.outputs[0]
            new_parts.append(x)
        cat = ir.Node("", "Concat", new_parts, attributes=[ir.AttrInt64("axis", ax)],
                      name=f"{concat.name}_hoisted")
        tag(cat, name)
        cat.outputs[0].type, cat.outputs[0].shape = last.type, last.shape
        new_nodes.append(cat)
        old = [concat, *(s.node for s in steps)]
        ir.convenience.replace_nodes_and_values(graph, concat, old, new_nodes, [last], [cat.outputs[0]])
        log.info("HoistGatheredConcatPass: %s + %d layout ops run per part", concat.name,
                 len(steps))
        return True

    @staticmethod
    def _apply(graph: ir.Graph, step: _Step, x: ir.Value, size: int, base: str, name: str,
               new_nodes: list[ir.Node]) -> ir.Value:
        """``step``'s op on one part ``x``, ``size`` long on the concat axis (no op of the chain
        changes that size: a Reshape keeps axes 1..c, a Slice never cuts axis c)."""
        node = step.node
        inputs, attrs = list(node.inputs), []
        inputs[0] = x
        if node.op_type == "Reshape":
            target = list(step.reshape)
            target[step.axis_in] = size
            inputs[1] = add_initializer(graph, f"{base}_shape", np.array(target, dtype=np.int64))
        elif node.op_type == "Transpose":
            attrs = [ir.AttrInt64s("perm", list(node.attributes["perm"].value))]
        new = ir.Node("", node.op_type, inputs, attributes=attrs, name=base)
        new.outputs[0].type = node.outputs[0].type
        new_nodes.append(tag(new, name))
        return new.outputs[0]


def _gather_source(part: ir.Value | None) -> ir.Node | None:
    """The ``Gather(U, idx, axis=0)`` producing ``part`` with 1-D indices, used only there."""
    if part is None:
        return None
    node = part.producer()
    if node is None or node.op_type != "Gather" or node.domain != "":
        return None
    axis = node.attributes.get("axis")
    if (axis.value if axis is not None else 0) != 0:
        return None
    idx = node.inputs[1]
    if idx.shape is None or len(idx.shape) != 1:
        return None
    return node
