"""Quantize step, job 2: the quantized stage graphs of one serving path.

A serving path (``("user", "group")`` or ``("full",)``) over the canonical stage graphs;
its layer groups (a 2-D weight, or every token of one per-token weight); the graphs with a
chosen set of groups kept in float; and the manifest rows describing each layer.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from exporter.errors import ExportError
from exporter.steps.quantize.options import QuantizeOptions
from graph_passes.onnx import canonicalize_linear, linear_layers, linear_weight_bytes, quantize_onnx
from graph_passes.onnx.pipelines import describe
from graph_passes.onnx.quantize import MIN_K


def group_of(weight: str) -> str:
    """The layer group of a weight: per-token pieces ``w.t3`` belong to ``w``, and so do a
    grouped-form MoE bank's per-expert pieces ``w.t3.e5`` (one group per bank weight); a
    fused-form bank's two weights ``bank.fused_w1`` / ``bank.fused_w2`` are one group ``bank``
    (QMoE quantizes both or neither)."""
    return re.sub(r"(\.t\d+(\.e\d+)?|\.fused_w[12])$", "", weight)


@dataclass
class _Path:
    """One serving path (``("user", "group")`` or ``("full",)``) over canonical stage graphs."""

    stages: tuple[str, ...]
    canonical: dict[str, onnx.ModelProto]
    quantized_stages: tuple[str, ...] = ("full", "user", "group")
    min_elements: dict[str, int] = field(default_factory=dict)  # per stage; missing = 0
    # (stage, weight, why) left fp32 for speed: below min_elements, or per-token off
    small: list[tuple[str, str, str]] = field(default_factory=list)
    groups: dict[str, list[tuple[str, str]]] = field(
        default_factory=dict
    )  # group -> [(stage, weight)]

    def __post_init__(self) -> None:
        for stage in self.stages:
            if stage not in self.quantized_stages:
                continue
            model = ir.serde.deserialize_model(self.canonical[stage])
            m = self.min_elements.get(stage, 0)
            for w in linear_layers(model, min_elements=m):
                self.groups.setdefault(f"{stage}:{group_of(w)}", []).append((stage, w))
            self.small += [(stage, w, why) for w, why in _small_weights(model, m)]

    def build(
        self,
        opts: QuantizeOptions,
        keep_float: Iterable[str] = (),
        only: Iterable[str] | None = None,
    ):
        """Quantized stage protos with the groups in ``keep_float`` (or outside ``only``) in float.

        Selection measures these (kept-float per-token weights unrolled, same numbers);
        the bundle gets ``final_build``."""
        keep, sel = set(keep_float), None if only is None else set(only)
        out, refusals = {}, []
        for stage in self.stages:
            names = [
                w
                for g, ws in self.groups.items()
                for s, w in ws
                if s == stage and (sel is None or g in sel) and g not in keep
            ]
            if not names:  # nothing to quantize here: the canonical fp32 graph, as is
                out[stage] = self.canonical[stage]
                continue
            res = _quantize_canonical(
                self.canonical[stage], opts, names, self.min_elements.get(stage, 0)
            )
            out[stage] = ir.serde.serialize_model(res.model)
            refusals += [f"{stage}: {line}" for line in describe(res.refusals)]
        return out, refusals

    def final_build(self, opts: QuantizeOptions, stages: dict[str, onnx.ModelProto], keep):
        """``build`` for the bundle: per-token weights kept in float are not unrolled (the
        batched MatMul runs faster in fp32 than T MatMuls with a Split and a Concat)."""
        skip = {s: _kept_weights(self, set(keep), s) for s in self.stages}
        final = copy.copy(self)
        final.canonical = dict(self.canonical)
        for s in self.stages:
            if not any(g not in keep for g, ws in self.groups.items() for st, _ in ws if st == s):
                final.canonical[s] = stages[s]  # nothing quantized: the stage as exported
            elif skip[s]:
                final.canonical[s] = _canonical(
                    s, stages[s], self.min_elements.get(s, 0), skip[s], s in opts.per_token_stages
                )
        return final.build(opts, keep_float=keep)


def _small_weights(model: ir.Model, min_elements: int) -> list[tuple[str, str]]:
    """(weight, why) of constant MatMul weights left in fp32 for speed: a reduction dim
    below ``MIN_K``, below ``min_elements``, or per-token weights this stage keeps batched."""
    from graph_passes.onnx._util import const_array

    out: list[tuple[str, int]] = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain != "":
            continue
        w = const_array(node.inputs[1])
        if w is None or w.ndim not in (2, 3) or w.dtype != np.float32:
            continue
        n = int(w[0].size if w.ndim == 3 else w.size)
        if any(node.inputs[1].name == name for name, _ in out):
            continue
        k = int(w.shape[-2])
        if k < MIN_K:  # the pass's own rule (graph_passes.onnx.quantize.weight_refusal)
            why = f"K={k} < min_k={MIN_K}: MatMulNBits pads K to {MIN_K}, int8 saves nothing"
            out.append((node.inputs[1].name or "", why))
        elif n < min_elements:
            why = f"{n} elements < min_elements={min_elements}, this stage's speed choice "
            why += "(smaller weights ran faster as fp32 GEMM; manifest quantization.speed_tuning)"
            out.append((node.inputs[1].name or "", why))
        elif w.ndim == 3:
            why = "per-token weight in a stage outside per_token_stages: one fp32 batched "
            why += "MatMul beats T MatMulNBits at large batch (QuantizeOptions.per_token_stages)"
            out.append((node.inputs[1].name or "", why))
    return out


def _quantize_canonical(
    canon: onnx.ModelProto, opts: QuantizeOptions, names: list[str], min_elements: int
):
    """``quantize_onnx`` of an already canonical stage: the named weights, as ``opts`` says."""
    return quantize_onnx(
        canon,
        bits=opts.bits,
        block_size=opts.block_size,
        target=opts.target,
        only=names,
        accuracy_level=opts.accuracy_level,
        canonicalize=False,
        min_elements=min_elements,
    )


def _kept_weights(path: _Path, keep: set[str], stage: str) -> set[str]:
    """Base weight names (``w`` of ``w.t3``) of the groups of ``stage`` kept in float."""
    return {group_of(w) for g in keep for s, w in path.groups.get(g, []) if s == stage}


def _canonical(
    stage: str,
    proto: onnx.ModelProto,
    min_elements: int = 0,
    keep_batched: Iterable[str] = (),
    unroll: bool = True,
) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(proto)
    try:
        canonicalize_linear(
            model,
            unroll_batched=unroll,
            unroll_min_elements=min_elements,
            keep_batched=frozenset(keep_batched),
        )
    except Exception as e:  # noqa: BLE001 - name the stage, keep the cause
        raise ExportError(
            f"cannot canonicalise {stage}.onnx for quantization: {type(e).__name__}: {e}"
        ) from e
    return ir.serde.serialize_model(model)


def _layer_rows(
    path: _Path, keep: set[str], table: dict[str, Any], opts: QuantizeOptions
) -> list[dict[str, Any]]:
    """One manifest row per layer group: precision, kernel, why, and its measured effect."""
    kernel = {
        "ort-cpu": f"MatMulNBits(bits={opts.bits}, accuracy_level={opts.accuracy_level})",
        "gpu": "DequantizeLinear(fp16) -> MatMul(fp16)",
        "qdq": "DequantizeLinear -> MatMul",
    }[opts.target]
    rows = []
    for g, members in path.groups.items():
        effect = table.get(g)
        rows.append(
            {
                "name": g,
                "stage": members[0][0],
                "weights": len(members),
                "precision": "fp32" if g in keep else f"int{opts.bits}",
                "kernel": "fp32 MatMul" if g in keep else kernel,
                "why": "accuracy: kept in float by the selection to meet the budget"
                if g in keep
                else "quantized: within the budget",
                "effect": None
                if effect is None
                else {
                    **{k: v for o in effect["outputs"].values() for k, v in o.items()},
                    "measured_on": effect["measured_on"],
                },
            }
        )
    for stage, weight, why in path.small:
        rows.append(
            {
                "name": f"{stage}:{weight}",
                "stage": stage,
                "weights": 1,
                "precision": "fp32",
                "kernel": "fp32 MatMul",
                "why": f"speed: {why}",
                "effect": None,
            }
        )
    return rows


def _bytes(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, int]:
    """Linear-layer weight bytes of a stage as exported (fp32) and as quantized."""
    b = linear_weight_bytes(ir.serde.deserialize_model(before))
    a = linear_weight_bytes(ir.serde.deserialize_model(after))
    return {
        "fp32": a["fp32"] or b["fp32"],
        "quantized": a["quantized"],
        "layers": a["layers"],
        "quantized_layers": a["quantized_layers"],
        "quantized_layers_fp32": a["quantized_layers_fp32"],
        "quantized_layers_bytes": a["quantized_layers_bytes"],
    }
