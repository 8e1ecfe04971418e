"""What the manifest says about the graphs, read back from the stage files as written.

The quantizer, the split and the threads step each plan something (a layer table, a list
of boundary tensors, a thread count per stage); the manifest must describe what the
written ONNX files hold, not what was intended. ``describe_written`` reads the facts from
the stage graphs and ``reconcile`` rewrites the planned manifest fields to match them,
returning one line per disagreement (logged as a warning: a disagreement is a bug in a
step, and the manifest still tells the truth).

Facts read from a graph:

- precision per layer: a ``MatMulNBits`` (its ``bits``) or a MatMul fed by a
  ``DequantizeLinear`` of an int8 / int4 constant is quantized, a ``DynamicQuantizeMatMul``
  is "w8a8" (int8 weights and activations, graph_passes/onnx/w8a8.py); the layer is named by the
  ``ugsep.weight`` metadata QuantizeWeightsInt8Pass writes; every other layer is fp32;
- boundary tensors: the user graph's outputs that the group graph reads (name, dtype, shape);
- intra-op threads: the ``ugsep.intra_op_threads`` metadata the threads step stamps on a
  stage graph (exporter.steps.threads).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import onnx

from runtime.manifest import BoundaryTensor, Quantization, Split
from runtime.manifest.tuning import QuantLayer

log = logging.getLogger(__name__)
THREADS_KEY = "ugsep.intra_op_threads"
_INT_TYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.INT4: "int4"}


def group_of(weight: str) -> str:
    """The layer group of a weight: per-token pieces ``w.t3`` belong to ``w``, and so do a
    grouped-form MoE bank's per-expert pieces ``w.t3.e5`` (one group per bank weight); a
    fused-form bank's two weights ``bank.fused_w1`` / ``bank.fused_w2`` are one group ``bank``
    (QMoE quantizes both or neither)."""
    return re.sub(r"(\.t\d+(\.e\d+)?|\.fused_w[12])$", "", weight)


def quantized_layers(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """{weight name: (precision, kernel)} of the layers this graph runs with quantized weights:
    precision "int8" | "int4" | "w8a8", kernel the op that runs it, as written."""
    out: dict[str, tuple[str, str]] = {}
    inits = {t.name: t for t in model.graph.initializer}
    dq_source = {
        n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output
    }
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            bits = attrs.get("bits", 4)
            kernel = f"MatMulNBits(bits={bits}, accuracy_level={attrs.get('accuracy_level', 0)})"
            out[props.get("ugsep.weight") or node.name] = (f"int{bits}", kernel)
        elif node.op_type == "QMoE" and node.domain == "com.microsoft" and "ugsep.weights" in props:
            block = attrs.get("block_size")
            kernel = f"QMoE(bits=8, {f'block_size={block}' if block else 'per channel'})"
            for w in props["ugsep.weights"].split(","):  # a fused-form MoE bank's two weights
                out[w] = ("int8", kernel)
        elif node.op_type == "DynamicQuantizeMatMul" and node.domain == "com.microsoft":
            # int8 weights and activations
            out[props.get("ugsep.weight") or node.name] = ("w8a8", "DynamicQuantizeMatMul")
        elif node.op_type == "Gather" and props.get("ugsep.pass") == "QuantizeExpertTablesPass":
            q = inits.get(node.input[0])  # a gather-form MoE table: int8 slices (or their scales)
            if q is not None and q.data_type in _INT_TYPES and "ugsep.weight" in props:
                out[props["ugsep.weight"]] = (_INT_TYPES[q.data_type], "Gather(int8) -> dequantize")
        elif node.op_type == "MatMul" and node.domain == "" and len(node.input) > 1:
            dq = dq_source.get(node.input[1])
            q = inits.get(dq.input[0]) if dq is not None else None
            if q is not None and q.data_type in _INT_TYPES:
                name = props.get("ugsep.weight") or re.sub(r"_dq$", "", dq.output[0])
                out[name] = (_INT_TYPES[q.data_type], "DequantizeLinear -> MatMul")
    return out


def quantized_weights(model: onnx.ModelProto) -> dict[str, str]:
    """{weight name: "int8" | "int4" | "w8a8"} of the layers this graph runs quantized."""
    return {w: prec for w, (prec, _) in quantized_layers(model).items()}


def _dims(value: onnx.ValueInfoProto) -> list[Any]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _dtype(value: onnx.ValueInfoProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name


def boundary_tensors(user: onnx.ModelProto, group: onnx.ModelProto) -> list[dict[str, Any]]:
    """The user graph's outputs the group graph reads: [{name, dtype, shape}] in output order."""
    reads = {i.name for i in group.graph.input}
    return [
        {"name": o.name, "dtype": _dtype(o), "shape": _dims(o)}
        for o in user.graph.output
        if o.name in reads
    ]


def stage_threads(model: onnx.ModelProto) -> int | None:
    """The intra-op thread count stamped on a stage graph (None: the serving default)."""
    for p in model.metadata_props:
        if p.key == THREADS_KEY:
            return int(p.value)
    return None


def set_stage_threads(model: onnx.ModelProto, threads: int | None) -> None:
    """Stamp (or, with None, remove) a stage graph's intra-op thread count."""
    keep = [p for p in model.metadata_props if p.key != THREADS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if threads is not None:
        model.metadata_props.append(onnx.StringStringEntryProto(key=THREADS_KEY, value=str(threads)))


def describe_written(stages: dict[str, onnx.ModelProto]) -> dict[str, Any]:
    """Per stage: quantized weights and threads; and the boundary when split."""
    facts: dict[str, Any] = {
        "quantized": {s: quantized_layers(m) for s, m in stages.items()},
        "threads": {s: stage_threads(m) for s, m in stages.items()},
    }
    if "user" in stages and "group" in stages:
        facts["boundary"] = boundary_tensors(stages["user"], stages["group"])
    return facts


def reconcile(
    fields: dict[str, Any], stage_meta: dict[str, dict[str, Any]], stages: dict[str, onnx.ModelProto]
) -> list[str]:
    """Rewrite the planned manifest ``fields`` / ``stage_meta`` (in place) to what ``stages``
    (the graphs as written) hold; one line per planned fact the graphs contradict."""
    facts = describe_written(stages)
    notes = _reconcile_threads(stage_meta, facts["threads"])
    if fields.get("split") is not None and "boundary" in facts:
        notes += _reconcile_boundary(fields["split"], facts["boundary"])
    if fields.get("quantization") is not None:
        notes += _reconcile_layers(fields["quantization"], facts["quantized"])
    for line in notes:
        log.warning("manifest follows the written graph: %s", line)
    return notes


def _reconcile_threads(stage_meta, threads: dict[str, int | None]) -> list[str]:
    notes = []
    for stage, n in threads.items():
        meta = stage_meta.setdefault(stage, {})
        planned = meta.get("intra_op_threads")
        if planned != n:
            notes.append(f"{stage}: planned intra_op_threads {planned}, the graph says {n}")
        if n is None:
            meta.pop("intra_op_threads", None)
        else:
            meta["intra_op_threads"] = n
    return notes


def _reconcile_boundary(split: Split, found: list[dict[str, Any]]) -> list[str]:
    planned = {b.name: b for b in split.boundary}
    notes = [f"boundary '{n}' is planned but not passed from user.onnx to group.onnx"
             for n in planned if n not in {b["name"] for b in found}]
    out = []
    for b in found:
        p = planned.get(b["name"])
        if p is None:
            notes.append(f"boundary '{b['name']}' is in the graphs but not in the plan")
        elif (p.dtype, list(p.shape)) != (b["dtype"], b["shape"]):
            notes.append(
                f"boundary '{b['name']}': planned {p.dtype} {p.shape}, "
                f"the graphs say {b['dtype']} {b['shape']}"
            )
        out.append(BoundaryTensor(**b, source=p.source if p else None))
    split.boundary = out
    return notes


def _reconcile_layers(
    record: Quantization, quantized: dict[str, dict[str, tuple[str, str]]]
) -> list[str]:
    """Each layer row's precision and kernel from its stage graph (by layer group); rows for
    quantized layers the plan did not list; ``kept_float`` recomputed; ``layers_source`` says so."""
    notes, seen = [], set()
    by_group = {
        s: {group_of(w): p for w, (p, _) in q.items()} for s, q in quantized.items()
    }
    kernels = {s: {group_of(w): k for w, (_, k) in q.items()} for s, q in quantized.items()}
    for row in record.layers:
        stage, group = row.stage, group_of(row.name.split(":", 1)[1])
        seen.add((stage, group))
        found = by_group.get(stage, {}).get(group, "fp32")
        if row.precision != found:
            notes.append(f"layer {row.name}: planned {row.precision}, the graph has {found}")
            row.why = f"graph: the written {stage}.onnx runs it {found} (planned {row.precision})"
            row.precision = found
            row.kernel = "fp32 MatMul" if found == "fp32" else kernels[stage][group]
        elif found != "fp32":
            row.kernel = kernels[stage][group]  # the op the graph runs it with
    for stage, groups in by_group.items():
        for group, prec in groups.items():
            if (stage, group) not in seen:
                notes.append(f"layer {stage}:{group} is {prec} in the graph but not in the plan")
                record.layers.append(QuantLayer(
                    name=f"{stage}:{group}", stage=stage, weights=1, precision=prec,
                    kernel=kernels[stage][group], why="graph: not in the plan", effect=None,
                ))
    layers = record.layers
    record.kept_float = [r.name for r in layers if r.precision == "fp32" and not r.why.startswith("speed")]
    record.quantized_layers = sum(r.precision != "fp32" for r in layers)
    record.layers_source = "read back from the written stage graphs (exporter.steps.graph_record)"
    return notes
