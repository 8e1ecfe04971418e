"""Embedding lookups: find them in a captured program, and cut the large ones out.

    FindEmbeddingsPass(spec).call(ep)        facts["lookups"]: every lookup of a parameter
                                             table by ids, with node.meta["ugsep.embedding"]
    CutEmbeddingsPass(spec, tables).call(ep) a new program in which each lookup of a table
                                             in ``tables`` is a new model input (the looked-up
                                             vectors); the tables are no longer parameters

A *lookup* is one of

    aten.embedding(W, ids)                    nn.Embedding, F.embedding
    aten.index.Tensor(W, [ids])               ``W[ids]`` on a parameter
    aten.embedding_bag.padding_idx(W, reshape(ids, [-1]), arange(0, numel, L), ...)
                                              nn.EmbeddingBag / F.embedding_bag on a 2-D id
                                              tensor [B, L] (modes sum, mean, max)

where W is a parameter or buffer of shape [rows, dim] and ``ids`` is a spec input, or a spec
input plus a constant of the id tensor's trailing shape (the per-field row offsets of a
table that stores several fields in one matrix, as ``students.base.FieldEmbedding`` does).
The runtime can compute exactly these ids, so it can do the lookup itself; a lookup whose
ids are computed otherwise (hashing, a slice of a mixed input) stays in the graph, with the
reason in ``facts["refused"]``.

The cut replaces a lookup by a placeholder ``emb<k>__<input>`` holding the gathered rows,
[B, *ids.shape[1:], dim] float32; a bag keeps its reduction in the graph (sum, mean or amax
over dim 1 of the gathered rows), so the compiled stages still reduce exactly as the model
did. The placeholder's side is the id input's side, so the UG split stays exact: user ids
are looked up once per user, candidate ids once per candidate.
"""

from __future__ import annotations

import operator
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.utils import _pytree as pytree

from graph_passes.fx._base import (
    PASS_KEY,
    PassResult,
    fqn_of,
    module_path,
    op_name,
    state_of,
    tensor_val,
    user_input_names,
)
from graph_passes.onnx.errors import PassError
from runtime.spec import FeatureSpec

aten = torch.ops.aten
EMBED_KEY = "ugsep.embedding"
PASS_NAME = "CutEmbeddingsPass"
BAG_MODES = {0: "sum", 1: "mean", 2: "max"}
_BAG_REDUCE = {"sum": aten.sum.dim_IntList, "mean": aten.mean.dim, "max": aten.amax.default}


@dataclass
class Lookup:
    """One embedding lookup of the captured graph (JSON-able via ``to_dict``)."""

    node: str  # the lookup node's name in the captured graph
    table: str  # the parameter's fully qualified name, e.g. "user_emb.table.weight"
    rows: int
    dim: int
    dtype: str
    op: str  # "embedding", "index" or "embedding_bag"
    mode: str | None = None  # bags: "sum" | "mean" | "max"
    input: str | None = None  # the spec input whose ids feed the lookup (None: refused)
    side: str | None = None
    offsets: list[int] | None = None  # constant added to the ids, per trailing position
    ids_shape: list[int] = field(default_factory=list)  # ids' shape without the batch
    module: str = ""
    reason: str | None = None  # why the lookup cannot leave the graph (None: it can)

    @property
    def table_bytes(self) -> int:
        return self.rows * self.dim * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FindEmbeddingsPass:
    """Analysis: every lookup of a parameter table, tagged ``meta["ugsep.embedding"]``."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec

    def call(self, ep: torch.export.ExportedProgram) -> PassResult:
        names = user_input_names(ep)
        fqn, state = fqn_of(ep), state_of(ep)
        lookups = []
        for n in ep.graph.nodes:
            found = _match(n, fqn)
            if found is None:
                continue
            weight, ids, op, extra = found
            w = state.get(weight.name)
            if w is None or w.dim() != 2:
                continue
            lk = Lookup(
                node=n.name,
                table=fqn[weight.name],
                rows=int(w.shape[0]),
                dim=int(w.shape[1]),
                dtype=str(w.dtype).replace("torch.", ""),
                op=op,
                mode=extra.get("mode"),
                module=module_path(n),
            )
            lk.reason = extra.get("reason") or self._ids(lk, ids, names, state)
            n.meta[EMBED_KEY] = lk.to_dict()
            lookups.append(lk)
        return PassResult(ep, False, {"lookups": lookups})

    def _ids(self, lk: Lookup, ids: fx.Node, names: dict[str, str], state) -> str | None:
        """Fill ``lk.input``/``offsets``/``side`` from the id expression; the reason if not."""
        val = tensor_val(ids)
        if val is None or val.dtype not in (torch.int64, torch.int32):
            return "the ids are not an integer tensor"
        lk.ids_shape = [int(d) for d in val.shape[1:]] if _static_tail(val) else []
        if not _static_tail(val):
            return "the ids have a dynamic shape beyond the batch dimension"
        src, offsets = ids, None
        if ids.op == "call_function" and ids.target is aten.add.Tensor and len(ids.args) == 2:
            src, const = ids.args
            c = state.get(const.name) if isinstance(const, fx.Node) else None
            if c is None and isinstance(const, int):
                c = torch.full(tuple(lk.ids_shape), const, dtype=torch.int64)
            if c is None:
                return f"the ids are computed ({op_name(ids)} of a non-constant)"
            try:
                full = torch.broadcast_to(c, tuple(lk.ids_shape))
            except RuntimeError:
                return "the constant added to the ids does not broadcast to their shape"
            offsets = [int(x) for x in full.reshape(-1).tolist()]
        if not isinstance(src, fx.Node) or src.op != "placeholder" or src.name not in names:
            return f"the ids are computed in the graph ({op_name(src) if isinstance(src, fx.Node) else src})"
        s = self.spec.input(names[src.name])
        if s.side not in ("user", "group"):
            return f"input '{s.name}' is {s.side} (user and item columns in one tensor)"
        if list(s.shape) != lk.ids_shape:
            return f"input '{s.name}' is reshaped before the lookup"
        lk.input, lk.side, lk.offsets = s.name, s.side, offsets
        return None


class CutEmbeddingsPass:
    """Transform: lookups of ``tables`` become model inputs; returns a new ExportedProgram.

    ``facts["stage_inputs"]``: [(placeholder name, Lookup)] in the order they were appended
    to the program's inputs (after the spec's own inputs).
    """

    def __init__(self, spec: FeatureSpec, tables: set[str]) -> None:
        self.spec, self.tables = spec, set(tables)

    def call(self, ep: torch.export.ExportedProgram) -> PassResult:
        found = FindEmbeddingsPass(self.spec).call(ep).facts["lookups"]
        cut = [lk for lk in found if lk.table in self.tables]
        bad = [lk for lk in cut if lk.reason]
        if bad:
            raise PassError(f"lookup {bad[0].node} of '{bad[0].table}' cannot leave the graph: {bad[0].reason}")
        if not cut:
            return PassResult(ep, False, {"stage_inputs": [], "lookups": found})
        kept = [lk for lk in found if lk.table not in self.tables]
        if shared := {lk.table for lk in kept} & self.tables:
            raise PassError(f"table(s) {sorted(shared)} are looked up both by id inputs and otherwise")
        gm = fx.GraphModule(ep.graph_module, _copy_graph(ep.graph))
        nodes = {n.name: n for n in gm.graph.nodes}
        last_ph = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        stage_inputs = []
        for k, lk in enumerate(cut):
            name = f"emb{k}__{_safe(lk.input)}"
            with gm.graph.inserting_after(last_ph):
                ph = gm.graph.placeholder(name)
            last_ph = ph
            _replace(gm.graph, nodes[lk.node], ph, lk)
            stage_inputs.append((name, lk))
        gm.graph.eliminate_dead_code()  # the gathers, the id arithmetic; not placeholders
        new_ep = _rebuild(ep, gm, [n for n, _ in stage_inputs], self.tables)
        return PassResult(new_ep, True, {"stage_inputs": stage_inputs, "lookups": found})


def _match(n: fx.Node, fqn: dict[str, str]):
    """(weight, ids, op, extra) when ``n`` looks up a state tensor by ids, else None."""
    if n.op != "call_function":
        return None
    a = n.args
    is_state = lambda x: isinstance(x, fx.Node) and x.op == "placeholder" and x.name in fqn  # noqa: E731
    if n.target is aten.embedding.default and is_state(a[0]):
        return a[0], a[1], "embedding", {}
    if n.target is aten.index.Tensor and is_state(a[0]) and len(a[1]) == 1 and a[1][0] is not None:
        return a[0], a[1][0], "index", {}
    if n.target in (aten.embedding_bag.padding_idx, aten.embedding_bag.default, aten._embedding_bag.default) and is_state(a[0]):
        return _match_bag(n)
    return None


def _match_bag(n: fx.Node):
    """An embedding bag over fixed-length rows: indices = reshape(ids [B, L], [-1])."""
    a = list(n.args) + [None] * 9
    weight, flat, offsets = a[0], a[1], a[2]
    mode = BAG_MODES.get(a[4] if a[4] is not None else 0, "?")
    extra: dict[str, Any] = {"mode": mode}
    ids = flat.args[0] if isinstance(flat, fx.Node) and flat.target in (aten.reshape.default, aten.view.default) else None
    ids_val = tensor_val(ids) if ids is not None else None
    step = offsets.args[2] if isinstance(offsets, fx.Node) and offsets.target is aten.arange.start_step else None
    if ids_val is None or ids_val.dim() != 2 or not _static_tail(ids_val) or step != int(ids_val.shape[1]):
        extra["reason"] = "an embedding bag with per-row offsets (not a 2-D id tensor)"
    elif a[6] is not None:
        extra["reason"] = "an embedding bag with per-sample weights"
    elif a[7]:
        extra["reason"] = "an embedding bag with include_last_offset"
    elif any(u.target is operator.getitem and u.args[1] != 0 and u.users for u in n.users):
        extra["reason"] = "the bag's offset outputs are used"
    return weight, ids if ids is not None else flat, "embedding_bag", extra


def _replace(g: fx.Graph, node: fx.Node, ph: fx.Node, lk: Lookup) -> None:
    """Route the lookup's users to ``ph`` (a bag: to its reduction of ``ph`` over dim 1)."""
    if lk.op != "embedding_bag":
        ph.meta["val"] = node.meta["val"]
        ph.meta[EMBED_KEY] = lk.to_dict()
        node.replace_all_uses_with(ph)
        return
    out = next(u for u in node.users if u.target is operator.getitem and u.args[1] == 0)
    val = out.meta["val"]
    ph.meta["val"] = val.new_empty((val.shape[0], lk.ids_shape[0], lk.dim))
    ph.meta[EMBED_KEY] = lk.to_dict()
    with g.inserting_after(out):
        red = g.call_function(_BAG_REDUCE[lk.mode], (ph, [1]))
    red.meta.update(val=val, **{PASS_KEY: PASS_NAME})
    out.replace_all_uses_with(red)


def _rebuild(ep, gm: fx.GraphModule, new_inputs: list[str], tables: set[str]):
    """A new ExportedProgram over ``gm``: the tables' parameters gone, ``new_inputs`` added."""
    sig = ep.graph_signature
    fqn = fqn_of(ep)
    dropped = {ph for ph, t in fqn.items() if t in tables}
    for n in list(gm.graph.nodes):
        if n.op == "placeholder" and n.name in dropped:
            if n.users:
                raise PassError(f"table placeholder {n.name} is still used after the cut")
            gm.graph.erase_node(n)
    specs = [s for s in sig.input_specs if s.arg.name not in dropped]
    specs += [InputSpec(kind=InputKind.USER_INPUT, arg=TensorArgument(name=n), target=None) for n in new_inputs]
    new_sig = type(sig)(input_specs=specs, output_specs=list(sig.output_specs))
    args, kwargs = pytree.tree_unflatten([None] * len(sig.user_inputs), ep.call_spec.in_spec)
    kwargs = {**kwargs, **{n: None for n in new_inputs}}
    in_spec = pytree.tree_flatten((args, kwargs))[1]
    entries = []
    for e in ep.module_call_graph:
        if e.fqn == "" and e.signature is not None:
            s = e.signature
            s = type(s)(inputs=s.inputs, outputs=s.outputs, in_spec=in_spec, out_spec=s.out_spec,
                        forward_arg_names=[*(s.forward_arg_names or []), *new_inputs])
            e = type(e)(fqn=e.fqn, signature=s)
        entries.append(e)
    state = {k: v for k, v in ep.state_dict.items() if k not in tables}
    constants = {k: v for k, v in ep.constants.items() if k not in tables}
    gm.recompile()
    return torch.export.ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=new_sig, state_dict=state,
        range_constraints=ep.range_constraints, module_call_graph=entries,
        example_inputs=None, constants=constants, verifiers=[ep.verifier],
    )


def _copy_graph(g: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(g, {})
    new.output(out)
    return new


def _static_tail(val: torch.Tensor) -> bool:
    return all(isinstance(d, int) for d in val.shape[1:])


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name)
