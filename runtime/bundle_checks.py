"""Structural checks on bundle load: the manifest must describe the files and graphs it ships.

The sha256 of every listed file proves the files are the ones the manifest names; these
checks prove the manifest tells the truth about them (docs/bundle-security.md):

- layout: every listed path stays inside the bundle; no symbolic links anywhere; no file
  the manifest does not list (refused, or ignored with a warning when allowed); no two
  stages share one graph file;
- graphs: each stage's ONNX inputs and outputs match the spec and the split boundary by
  name, dtype and shape (a user stage takes user inputs only, a group stage candidate
  inputs, boundary tensors and ``user_index``), and the manifest's stage entry lists them;
- tables: an id input's vocabulary fits every embedding table it indexes (ids up to
  ``vocab - 1``, plus any constant offset added on the way, stay below the table's rows).

Graphs are read by ``runtime.onnx_wire`` (no weights copied, no ``onnx`` import).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

from runtime.errors import BundleError
from runtime.manifest import MANIFEST_NAME, SMALL_GROUP, Manifest, Stage
from runtime.onnx_wire import GraphInfo, Node, ValueInfo, read_graph
from runtime.signing import SIGNATURE_NAME

log = logging.getLogger(__name__)
# beside the listed files: the manifest itself and its signature (which cannot list itself)
KNOWN_UNLISTED = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
USER_INDEX = "user_index"
# ops whose output holds the same id values as their first input (reshaped, cast, selected)
_ID_PRESERVING = frozenset({"Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity",
                            "Transpose", "Expand", "Slice", "Split", "Tile", "Gather"})
_TABLE_LOOKUPS = {"Gather": "axis", "GatherBlockQuantized": "gather_axis"}
_TABLE_PRODUCERS = frozenset({"DequantizeLinear", "Cast", "Identity"})


def check_layout(root: Path, manifest: Manifest, *, allow_extra_files: bool = False) -> None:
    """Paths inside the bundle, no symlinks, no unlisted files, one graph file per stage."""
    engine_dirs = [e.dir for e in manifest.engines]
    for rel in [*manifest.files, *(st.file for st in manifest.stages.values()), *engine_dirs]:
        _check_rel_path(root, rel)
    extra = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                raise BundleError(
                    f"bundle '{root}': '{rel}' is a symbolic link (to '{os.readlink(p)}'); a "
                    "bundle holds regular files only"
                )
            if name in filenames and not p.is_file():
                raise BundleError(f"bundle '{root}': '{rel}' is not a regular file")
            if name in filenames and rel not in manifest.files and rel not in KNOWN_UNLISTED:
                extra.append(rel)
    if extra and not allow_extra_files:
        raise BundleError(
            f"bundle '{root}': file '{extra[0]}' is not listed in the manifest"
            + (f" (nor are {len(extra) - 1} more)" if len(extra) > 1 else "")
            + "; a bundle holds only the files its manifest lists: remove it, or pass "
            "allow_extra_files=True (CLI: --allow-extra-files) to ignore unlisted files"
        )
    if extra:
        log.warning("bundle '%s': ignoring files the manifest does not list: %s", root, ", ".join(extra))
    _check_distinct_stage_files(root, manifest)


def _check_rel_path(root: Path, rel: str) -> None:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or rel.startswith("~"):
        raise BundleError(f"bundle '{root}': file path '{rel}' escapes the bundle")


def _check_distinct_stage_files(root: Path, manifest: Manifest) -> None:
    owner: dict[str, str] = {}
    for stage, st in manifest.stages.items():
        other = owner.setdefault(st.file, stage)
        if other != stage:
            raise BundleError(
                f"bundle '{root}': stages '{other}' and '{stage}' both point at '{st.file}'; "
                "each stage has its own graph file (the manifest was edited?)"
            )


def check_graphs(root: Path, manifest: Manifest) -> dict[str, GraphInfo]:
    """Every stage graph against the spec, the boundary and its manifest entry; returns them."""
    graphs = {}
    for stage, st in manifest.stages.items():
        g = read_graph(root / st.file)
        where = f"bundle '{root}': stage '{stage}' graph '{st.file}'"
        _check_listed_names(where, st, g)
        _check_stage_io(where, stage, manifest, g)
        check_vocab_tables(where, manifest, g)
        graphs[stage] = g
    return graphs


def _check_listed_names(where: str, entry: Stage, g: GraphInfo) -> None:
    for key, values in (("inputs", g.inputs), ("outputs", g.outputs)):
        listed = getattr(entry, key)
        names = [v.name for v in values]
        if listed is not None and sorted(listed) != sorted(names):
            raise BundleError(
                f"{where}: the manifest lists {key} {listed} but the graph's {key} are {names}"
            )


def _expected(stage: str, manifest: Manifest) -> tuple[dict, list[str], str]:
    """(allowed inputs {name: (dtype, full shape)}, required outputs, what the inputs are)."""
    allowed, required, what = _expected_from_spec(stage, manifest)
    for lk in manifest.embeddings.lookups if manifest.embeddings else []:  # rows the runtime looks up
        if stage == "full" or lk.side == ("user" if stage == "user" else "group"):
            allowed[lk.stage_input] = ("float32", None)
    return allowed, required, what


def _expected_from_spec(stage: str, manifest: Manifest) -> tuple[dict, list[str], str]:
    spec = manifest.spec
    boundary = manifest.split.boundary if manifest.split else []
    def entry(s):
        return (s.dtype, ["batch", *s.shape])
    if stage == "user":
        allowed = {s.name: entry(s) for s in spec.inputs if s.side in ("user", "mixed")}
        return allowed, [b.name for b in boundary], "a user-side input of the spec"
    if stage in ("group", SMALL_GROUP):
        allowed = {s.name: entry(s) for s in spec.group_inputs}
        allowed.update({b.name: (b.dtype, b.shape) for b in boundary})
        allowed[USER_INDEX] = ("int64", ["N"])
        what = "a candidate input of the spec, a boundary tensor or user_index"
        return allowed, list(spec.outputs), what
    return {s.name: entry(s) for s in spec.inputs}, list(spec.outputs), "an input of the spec"


def _check_stage_io(where: str, stage: str, manifest: Manifest, g: GraphInfo) -> None:
    allowed, required, what = _expected(stage, manifest)
    for v in g.inputs:
        if v.name not in allowed:
            raise BundleError(
                f"{where} has input '{v.name}', which is not {what} (expected among: "
                f"{', '.join(allowed)}); the stage points at the wrong graph or the manifest "
                "was edited"
            )
        _check_value(where, "input", v, *allowed[v.name])
    outputs = {v.name: v for v in g.outputs}
    for name in required:
        if name not in outputs:
            raise BundleError(
                f"{where} has no output '{name}' (its outputs: {', '.join(outputs)}); the "
                "stage points at the wrong graph or the manifest was edited"
            )
    if stage == "user":
        for b in manifest.split.boundary if manifest.split else []:
            _check_value(where, "output", outputs[b.name], b.dtype, b.shape)


def _check_value(where: str, kind: str, v: ValueInfo, dtype, shape) -> None:
    """Dtype and shape of a graph input/output against the manifest (dim 0 is the batch)."""
    if dtype and v.dtype and v.dtype != dtype:
        raise BundleError(
            f"{where}: {kind} '{v.name}' is {v.dtype} in the graph; the manifest says {dtype}"
        )
    if shape is None or v.dims is None:
        return
    bad = len(v.dims) != len(shape) or any(
        isinstance(a, int) and isinstance(b, int) and a > 0 and a != b
        for a, b in zip(v.dims[1:], shape[1:], strict=False)
    )
    if bad:
        raise BundleError(
            f"{where}: {kind} '{v.name}' has shape {_fmt(v.dims)} in the graph; the manifest "
            f"says {_fmt(shape)} (dim 0 is the batch)"
        )


def _fmt(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


# -- embedding tables against the spec's vocabularies -----------------------------------------
def check_vocab_tables(where: str, manifest: Manifest, g: GraphInfo) -> None:
    """Refuse when ids within an input's vocabulary could index past a table's last row."""
    consumers: dict[str, list[tuple[Node, int]]] = {}
    for n in g.nodes:
        for pos, name in enumerate(n.inputs):
            consumers.setdefault(name, []).append((n, pos))
    producers = {o: n for n in g.nodes for o in n.outputs}
    graph_inputs = {v.name for v in g.inputs}
    for s in manifest.spec.inputs:
        if s.vocab is not None and s.name in graph_inputs:
            for table, rows, offset in _tables_indexed_by(s.name, g, consumers, producers):
                top = s.vocab - 1 + offset
                if top >= rows:
                    plus = f" plus offset {offset} = {top}" if offset else ""
                    raise BundleError(
                        f"{where}: input '{s.name}' has vocab {s.vocab} in the manifest's spec, "
                        f"but it indexes table '{table}' of {rows} rows: ids up to "
                        f"{s.vocab - 1}{plus} would read past its end (the manifest's vocabulary "
                        "was edited or does not belong to this graph)"
                    )


def _tables_indexed_by(name: str, g: GraphInfo, consumers, producers):
    """Yield (table, rows, largest constant offset) for each table lookup ``name`` reaches."""
    todo, seen = [(name, 0)], set()
    while todo:
        value, offset = todo.pop()
        if (value, offset) in seen:
            continue
        seen.add((value, offset))
        for node, pos in consumers.get(value, []):
            if node.op_type in _TABLE_LOOKUPS and pos == 1:
                found = _table_rows(node, g, producers)
                if found:
                    yield found[0], found[1], offset
            elif (node.op_type in _ID_PRESERVING and pos == 0) or node.op_type == "Concat":
                todo.extend((o, offset) for o in node.outputs)
            elif node.op_type == "Add" and len(node.inputs) == 2:
                added = _constant_ints(node.inputs[1 - pos], g, producers)
                if added:
                    todo.append((node.outputs[0], offset + max(0, max(added))))


def _table_rows(node: Node, g: GraphInfo, producers) -> tuple[str, int] | None:
    """(table name, rows along the lookup axis) when the table is a constant, else None."""
    table = node.inputs[0]
    while table not in g.initializers and table in producers:
        p = producers[table]
        if p.op_type not in _TABLE_PRODUCERS:
            return None
        table = p.inputs[0]
    t = g.initializers.get(table)
    if t is None or not t.dims:
        return None
    axis = node.ints.get(_TABLE_LOOKUPS[node.op_type], 0)
    return table, t.dims[axis % len(t.dims)]


def _constant_ints(name: str, g: GraphInfo, producers) -> list[int] | None:
    if name in g.initializers:
        return g.initializers[name].int_values()
    p = producers.get(name)
    if p is not None and p.op_type == "Constant" and "value" in p.tensors:
        return p.tensors["value"].int_values()
    return None
