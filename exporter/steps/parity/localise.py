"""Localisation: the first tensor along the graph where a compiled stage leaves the reference.

Reference side: the model's ExportedProgram, decomposed as torch.onnx decomposes it
before conversion, run node by node (torch.fx.Interpreter) with every tensor kept.
Stage side: the stage's ONNX graphs with every intermediate value exposed as an
extra output, run with ONNX Runtime on the same rows. Values are matched through the
metadata torch.onnx writes on each node (the FX node name, its module path and its
aten target): by FX name when module and target agree too (full.onnx, name-keeping
splits), else by (module path, target, occurrence) when a module's ops of that kind
all live in the graph at hand (separately exported user / group graphs). User-graph
values [M, ...] are gathered by ``user_index`` to the reference's rows [N, ...].

Walking the reference in topological order, the first matched tensor whose RMS error
exceeds the tolerance relative to the tensor's RMS (near-zero tensors: relative to the
graph's typical activation scale, so float noise on them is not blamed) is reported with
the module path torch.export recorded and the model source line that produced it. An
error first seen on a view-like op (view, reshape, permute, ...) is blamed on the op that
computed the viewed tensor.
"""

from __future__ import annotations

import ast
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch.utils import _pytree as pytree

from exporter.evaluate.stages import Rows, user_rows
from exporter.steps.capture import capture, to_torch_inputs
from runtime.bundle import Bundle
from runtime.embstore import StoreFeeds
from runtime.manifest import SMALL_GROUP
from runtime.scorer import USER_INDEX
from runtime.spec import FeatureSpec

log = logging.getLogger(__name__)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
QUANTIZED_TOLERANCE = 0.05
MAX_ROWS = 256
FLOOR_SHARE = 0.01  # tensors with an RMS below 1% of the graph's median are near zero
# ops that only move or alias data: an error seen on one was made upstream
VIEW_OPS = frozenset(
    "view _unsafe_view reshape permute transpose t expand squeeze unsqueeze slice select "
    "flatten unflatten clone contiguous alias detach split split_with_sizes unbind "
    "index_select narrow chunk movedim".split()
)
_TARGET = re.compile(r"target=([\w.]+)")


@dataclass
class RefNode:
    """One reference tensor: FX name, module path, aten target, source line, value, and the
    FX nodes it reads."""

    name: str
    path: str
    module_type: str
    target: str
    code: str
    value: np.ndarray
    inputs: tuple[str, ...] = ()


@dataclass
class OnnxValue:
    """One ONNX value that carries an FX node's result."""

    fx_name: str
    path: str
    target: str
    value_name: str
    graph: str


def localise_stage(
    bundle: Bundle,
    stage: str,
    model: torch.nn.Module,
    spec: FeatureSpec,
    rows: Rows,
    *,
    program: Any = None,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Find where ``stage`` of ``bundle`` first diverges from ``model``; a JSON-able record."""
    precision = bundle.manifest.precision
    tol = tolerance or TOLERANCE.get(precision, QUANTIZED_TOLERANCE)
    n = min(MAX_ROWS, len(next(iter(rows.values()))))
    rows = {s.name: np.ascontiguousarray(rows[s.name][:n]) for s in spec.inputs}
    ref = reference_values(program if program is not None else capture(model, spec), spec, rows)
    if stage.startswith("onnx-full"):
        got, where = _run_full(bundle, rows)
    elif stage.startswith("onnx-split"):
        group = SMALL_GROUP if stage.startswith("onnx-split-small") else "group"
        got, where = _run_split(bundle, spec, rows, group)
    else:
        return {"stage": stage, "note": f"localisation does not support stage '{stage}'"}
    return first_divergence(ref, got, where, tol) | {"stage": stage, "rows": n}


def reference_values(program, spec: FeatureSpec, rows: Rows) -> list[RefNode]:
    """Every tensor the (ONNX-decomposed) program computes on ``rows``, in topological order."""
    program = _decompose_like_onnx(program)
    gm = program.module()
    kwargs = to_torch_inputs(spec, rows)
    flat, in_spec = pytree.tree_flatten(((), kwargs))
    if in_spec != program.call_spec.in_spec:
        raise ValueError(f"rows do not match the program's inputs ({program.call_spec.in_spec})")
    values: dict[str, Any] = {}

    class _Keep(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            values[node.name] = out
            return out

    with torch.no_grad():
        _Keep(gm).run(*flat)
    out = []
    for node in gm.graph.nodes:
        v = values.get(node.name)
        if node.op != "call_function" or not isinstance(v, torch.Tensor):
            continue
        path, mtype = _module_of(node)
        args = tuple(a.name for a in node.all_input_nodes)
        out.append(
            RefNode(
                node.name, path, mtype, str(node.target), _code_of(node), v.detach().numpy(), args
            )
        )
    return out


def _decompose_like_onnx(program):
    """The program as torch.onnx sees it (its node names become the ONNX value names)."""
    try:
        from torch.onnx._internal.exporter import _core, _registration

        registry = _registration.ONNXRegistry.from_torchlib()
        return _core._prepare_exported_program_for_export(program, registry=registry)
    except Exception as e:  # noqa: BLE001 - private API; the raw program still matches most names
        log.info("could not decompose the program as torch.onnx does (%s); using it as is", e)
        return program


def _module_of(node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, mtype = list(stack.values())[-1]
    return ("" if path.startswith("_empty_nn_module_stack") else str(path)), str(mtype)


def _code_of(node) -> str:
    """The innermost frame of the stack trace that is model code (not torch itself)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)', trace)
    own = [f for f in frames if "/torch/" not in f[0] and not f[0].startswith("torch/")]
    if not own:
        return ""
    file, line, fn, code = own[-1]
    return f"{file}:{line} in {fn}: {code.strip()}"


def onnx_values(model: onnx.ModelProto, graph: str) -> list[OnnxValue]:
    """For each FX node the exporter lowered, the ONNX value holding its result (graph order)."""
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    meta: dict[str, tuple[str, str]] = {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = _scopes(props)
        fx = props.get("pkg.torch.onnx.fx_node", "")
        if not scopes or not node.output:
            continue
        name = scopes[-1]
        target = _TARGET.search(fx)
        groups[name].append(node)
        meta[name] = (scopes[-2] if len(scopes) >= 2 else "", target.group(1) if target else "")
    out = []
    for name, nodes in groups.items():
        outputs = [o for nd in nodes for o in nd.output if o]
        value = name if name in outputs else nodes[-1].output[0]
        path, target = meta[name]
        out.append(OnnxValue(name, path, target.replace("torch.ops.", ""), value, graph))
    return out


def _scopes(props: dict[str, str]) -> list[str]:
    """torch.onnx's name scopes of a node: ['', 'mod', 'mod.sub', '<fx node name>'] (or [])."""
    try:
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return []
    if not isinstance(scopes, list) or not all(isinstance(x, str) for x in scopes):
        return []
    return scopes if len(scopes) >= 2 else []


def match(ref: list[RefNode], values: list[OnnxValue], by_name: bool = True) -> dict[str, OnnxValue]:
    """Reference node name -> ONNX value (see the module docstring for the rules).
    ``by_name=False``: the graphs were exported from a rewritten program whose FX names
    need not be the reference's (embedding tables cut out for the store renumber nodes), so
    only the structural rule applies."""
    matched: dict[str, OnnxValue] = {}
    by_name = {r.name: r for r in ref} if by_name else {}
    for v in values:
        r = by_name.get(v.fx_name)
        if r is not None and (r.path, r.target) == (v.path, v.target):
            matched[r.name] = v
    ref_groups: dict[tuple[str, str], list[RefNode]] = defaultdict(list)
    val_groups: dict[tuple[str, str], list[OnnxValue]] = defaultdict(list)
    for r in ref:
        ref_groups[(r.path, r.target)].append(r)
    for v in values:
        val_groups[(v.path, v.target)].append(v)
    taken = {id(v) for v in matched.values()}
    for key, vs in val_groups.items():
        rs = ref_groups.get(key, [])
        if len(rs) == len(vs) and not any(id(v) in taken for v in vs):
            matched.update(
                {r.name: v for r, v in zip(rs, vs, strict=True) if r.name not in matched}
            )
    return matched


def first_divergence(ref: list[RefNode], got: dict[str, Any], where, tol: float) -> dict[str, Any]:
    """Walk ``ref`` in order; the first matched tensor whose error exceeds ``tol`` relative to
    its RMS (``rms_error``; near-zero tensors are measured against the graph's typical scale).
    A view-like op cannot make an error, only show one: the blame goes to the op that made
    its input (``seen_at`` names the view the error was measured on)."""
    pairs = match(ref, got["values"], by_name=got.get("same_names", True))
    floor = FLOOR_SHARE * _typical_rms(ref)
    compared, last_ok = 0, None
    agreeing: dict[str, set[str]] = defaultdict(set)
    for r in ref:
        v = pairs.get(r.name)
        if v is None or (v.graph, v.value_name) not in got["arrays"]:
            continue
        cand = got["arrays"][(v.graph, v.value_name)]
        if v.graph == "user.onnx" and cand.ndim and r.value.ndim and cand.shape[0] == where["m"]:
            cand = cand[where["user_index"]]
        if cand.shape != r.value.shape:
            continue
        compared += 1
        err = rms_error(r.value, cand, floor)
        if err > tol:
            first = _describe(r, v, cand, err)
            origin = _producer(r, {x.name: x for x in ref})
            if origin is not r:
                first = {**first, **_blame(origin), "seen_at": {"name": r.name, "op": r.target}}
            return {
                "tolerance": tol,
                "measure": "rms(error) / max(rms(reference), scale floor)",
                "scale_floor": floor,
                "compared": compared,
                "matched": len(pairs),
                "last_agreeing": last_ok,
                "first_divergence": first,
                "upstream": upstream_ops(got["models"][v.graph], v.value_name, agreeing[v.graph]),
            }
        last_ok = r.name
        agreeing[v.graph].add(v.value_name)
    return {
        "tolerance": tol,
        "compared": compared,
        "matched": len(pairs),
        "first_divergence": None,
        "note": f"no matched tensor diverges by more than {tol:g} (relative to its RMS); "
        "the error builds up gradually or arises in unmatched tensors",
    }


def _is_view(target: str) -> bool:
    op = target.removeprefix("aten.").split(".")[0]
    return op in VIEW_OPS


def _producer(r: RefNode, by_name: dict[str, RefNode]) -> RefNode:
    """``r``, or for a view-like op the nearest op up its first input that computes."""
    seen = 0
    while _is_view(r.target) and r.inputs and r.inputs[0] in by_name and seen < 64:
        r, seen = by_name[r.inputs[0]], seen + 1
    return r


def _blame(r: RefNode) -> dict[str, Any]:
    return {
        "name": r.name,
        "op": r.target,
        "module": r.path,
        "module_type": r.module_type,
        "code": r.code,
        "shape": list(r.value.shape),
    }


def upstream_ops(
    model: onnx.ModelProto, value: str, agreeing: set[str], limit: int = 8
) -> list[dict[str, Any]]:
    """ONNX nodes between the last agreeing tensors and ``value`` (nearest first).

    Nodes a graph pass made carry ``ugsep.pass`` / ``ugsep.weight`` metadata, so a
    rewritten or quantized layer with no counterpart in the reference is still named.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, out, frontier = set(), [], [value]
    while frontier and len(out) < limit:
        node = producer.get(frontier.pop(0))
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        props = {p.key: p.value for p in node.metadata_props}
        scopes = _scopes(props)
        entry = {"op": node.op_type, "node": node.name, "module": scopes[-2] if scopes else ""}
        entry.update({k.split(".", 1)[1]: v for k, v in props.items() if k.startswith("ugsep.")})
        out.append(entry)
        frontier.extend(i for i in node.input if i and i not in agreeing)
    return out


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a.astype(np.float64))))) if a.size else 0.0


def _typical_rms(ref: list[RefNode]) -> float:
    """The median RMS of the reference's float tensors: the graph's activation scale."""
    values = [_rms(r.value) for r in ref if r.value.dtype.kind == "f" and r.value.size]
    values = [v for v in values if np.isfinite(v)]
    return float(np.median(values)) if values else 1.0


def rms_error(ref: np.ndarray, got: np.ndarray, floor: float = 0.0) -> float:
    """rms(got − ref) / max(rms(ref), floor): robust to near-zero elements (a per-element
    relative error, or a max over a near-zero tensor, blames float noise there)."""
    r, g = ref.astype(np.float64), got.astype(np.float64)
    if r.size == 0:
        return 0.0
    if not np.all(np.isfinite(g)):
        return float("inf")
    return _rms(r - g) / max(_rms(r), floor, 1e-12)


def _describe(r: RefNode, v: OnnxValue, cand: np.ndarray, err: float) -> dict[str, Any]:
    return {
        "name": r.name,
        "graph": v.graph,
        "onnx_value": v.value_name,
        "op": r.target,
        "module": r.path,
        "module_type": r.module_type,
        "code": r.code,
        "shape": list(r.value.shape),
        "rms_rel_error": err,
        "max_abs": float(np.max(np.abs(r.value.astype(np.float64) - cand.astype(np.float64)))),
    }


def _run_with_values(model: onnx.ModelProto, graph: str, feeds: Rows):
    """Run ``model`` with every FX-carrying value exposed; (values, {(graph, name): array})."""
    import onnxruntime as ort

    values = onnx_values(model, graph)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for v in values:
        if v.value_name not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=v.value_name))
            have.add(v.value_name)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()})
    return values, {(graph, k): a for k, a in zip(names, outs, strict=True)}


def _with_store(store, rows: Rows, side: str) -> Rows:
    """``rows`` plus the embedding-store lookups of ``side`` (the graphs take the gathered
    rows, not the ids, for tables that left them; ``store`` None: unchanged); copies, as the
    store reuses its buffers between calls."""
    if store is None:
        return rows
    return {k: np.array(v) for k, v in store.feeds(rows, side).items()}


def _run_full(bundle: Bundle, rows: Rows):
    store = StoreFeeds.for_bundle(bundle)
    model = onnx.load(str(bundle.stage_path("full")))
    values, arrays = _run_with_values(model, "full.onnx", _with_store(store, rows, "both"))
    got = {"values": values, "arrays": arrays, "models": {"full.onnx": model},
           "same_names": store is None}
    return got, {"m": None, "user_index": None}


def _run_split(bundle: Bundle, spec: FeatureSpec, rows: Rows, stage: str = "group"):
    users, user_index = user_rows(spec, rows)
    store = StoreFeeds.for_bundle(bundle)
    user = onnx.load(str(bundle.stage_path("user")))
    group = onnx.load(str(bundle.stage_path(stage)))
    uv, ua = _run_with_values(user, "user.onnx", _with_store(store, users, "user"))
    boundary = {k: a for (_, k), a in ua.items()}
    feeds = {**_with_store(store, rows, "group"), **boundary, USER_INDEX: user_index}
    gname = f"{stage}.onnx"
    gv, ga = _run_with_values(group, gname, feeds)
    m = len(next(iter(users.values())))
    models = {"user.onnx": user, gname: group}
    got = {"values": uv + gv, "arrays": {**ga, **ua}, "models": models,
           "same_names": store is None}
    return got, {"m": m, "user_index": user_index}
