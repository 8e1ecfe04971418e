"""Precision ``w8a8``: int8 weights and int8 activations quantized at run time (ORT CPU).

The group side of a split bundle is compute-bound (hundreds of candidates per call); there
ONNX Runtime's integer GEMM (``com.microsoft.DynamicQuantizeMatMul``: activations quantized
per call to uint8, u8s8 MLAS QGEMM, graph_passes/onnx/w8a8.py) can beat fp32 SGEMM. The user
side runs at batch 1, where the weight-only ``MatMulNBits`` (w8a16) or fp32 may be faster.
So, per stage, by timing on this CPU (exporter.timing, as the w8a16 speed tuner):

 1. configurations (user and group; the full graph of a split bundle stays fp32,
    ``FULL_FP32``; an unsplit bundle's full graph is tuned as the group): fp32 as
    exported; w8a8 at each ``min_elements`` of the tuner's grid, with per-token weights
    unrolled or kept batched; the user stage gets the w8a16 configurations instead (it is
    never w8a8: one user call serves the distinct users of merged requests and its outputs
    are cached, so a per-call activation range would leak from one request into another);
 2. each stage takes its fastest configuration (ties to the one quantizing more);
 3. accuracy, against the eager fp32 outputs on held-out rows under the w8a16 ranking budget
    (|ΔAUC|, top-10 overlap, max abs): all chosen layers quantized; if that misses, each layer
    group alone is measured, ranked by the share of the budget it uses, and the fewest most
    damaging groups are kept float (bisection), as for w8a16 (exporter/steps/quantize/select.py).

A served stage left with DynamicQuantizeMatMul mixes the rows of its call (one activation
range per tensor, per call): ``mark_call_scoped`` records it as request-scoped in
``manifest.row_scope``, so the runtime runs one group call per request and a request's scores
never depend on another request's candidates (they still depend, within budget, on its own).

The parity verdict on the written bundle is the judge (budget ``w8a8`` = ``w8a16``'s). Every
choice goes to ``manifest.quantization``: ``scheme`` (per stage), ``speed_tuning`` (every
configuration timed), ``layers`` (kernel and why per layer group), ``outcome`` and
``weight_bytes``; ``ugsep inspect`` prints them.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx
import onnx_ir as ir

from exporter import timing
from exporter.errors import ExportError
from exporter.steps.quantize.build import _bytes, _canonical, _quantize_canonical, group_of
from exporter.steps.quantize.calibrate import calibration_for
from exporter.steps.quantize.options import QuantizeOptions
from exporter.steps.quantize.runner import _Runner
from exporter.steps.quantize.select import budget_damage
from exporter.steps.quantize.speed import (
    FP32,
    MIN_ELEMENTS_GRID,
    choose,
    quantized_elements,
)
from graph_passes.onnx import linear_layers
from graph_passes.onnx.w8a8 import KERNEL, dynamic_quantize_matmuls, weight_bits_for_cpu
from runtime.manifest import Quantization
from runtime.manifest.sections import RowMixing

log = logging.getLogger(__name__)

W8A8, W8A16 = "w8a8", "w8a16"
KERNELS = {
    W8A8: f"com.microsoft.{KERNEL} (uint8 activations per tensor at run time, int8 weights)",
    W8A16: "com.microsoft.MatMulNBits(bits=8, accuracy_level=4)",
}


class _Plan:
    """One stage's chosen configuration: scheme, canonical graph and the layers it quantizes."""

    def __init__(self, stage: str, scheme: str, canon: onnx.ModelProto | None, names: list[str],
                 min_elements: int, weight_bits: int) -> None:
        self.stage, self.scheme, self.canon, self.names = stage, scheme, canon, names
        self.min_elements, self.weight_bits = min_elements, weight_bits

    def build(self, original: onnx.ModelProto, only: set[str] | None = None) -> onnx.ModelProto:
        """The stage with ``only`` (default: all its layers) quantized by its scheme."""
        names = [n for n in self.names if only is None or n in only]
        if self.scheme == "fp32" or not names:  # nothing quantized: the stage as exported
            return original
        return _build(self.scheme, self.canon, names, self.min_elements, self.weight_bits)


def _build(scheme: str, canon: onnx.ModelProto, names: list[str], m: int, bits: int) -> onnx.ModelProto:
    if scheme == W8A16:
        opts = QuantizeOptions(precision=W8A16, tune=False, min_elements=m, per_token_stages=())
        return ir.serde.serialize_model(_quantize_canonical(canon, opts, names, m).model)
    model = ir.serde.deserialize_model(canon)
    dynamic_quantize_matmuls(model, only=names, min_elements=m, weight_bits=bits)
    return ir.serde.serialize_model(model)


def tune_stage(stage: str, proto: onnx.ModelProto, weight_bits: int, threads: int | None,
               w8a16_too: bool) -> tuple[_Plan, dict[str, Any]]:
    """Time fp32 and the w8a8 (and, ``w8a16_too``, w8a16) configurations of one stage."""
    configs = [timing.Config(FP32, None, False, proto)]
    plans: dict[str, _Plan] = {FP32: _Plan(stage, "fp32", None, [], 0, weight_bits)}
    seen: set[tuple[str, frozenset[str]]] = set()
    # the user stage is never w8a8: one user call serves the distinct users of merged requests
    # and its outputs are cached, so a per-call activation range would leak between requests
    schemes = (W8A16,) if w8a16_too else (W8A8,)
    for per_token in (False, True):
        for m in MIN_ELEMENTS_GRID:
            canon = _canonical(stage, proto, m, unroll=per_token)
            names = linear_layers(ir.serde.deserialize_model(canon), min_elements=m)
            for scheme in schemes:
                if not names or (scheme, frozenset(names)) in seen:
                    continue
                seen.add((scheme, frozenset(names)))
                tag = f"{scheme}:min_elements={m},per_token={'on' if per_token else 'off'}"
                q = _build(scheme, canon, names, m, weight_bits)
                elements = quantized_elements(canon, names)
                configs.append(timing.Config(tag, m, per_token, q, elements, len(names)))
                plans[tag] = _Plan(stage, scheme, canon, names, m, weight_bits)
    batch = timing.stage_batch(stage)
    medians = timing.time_configs(configs, batch, threads=threads) if len(configs) > 1 else {
        FP32: 0.0}
    chosen = choose(configs, medians)
    base = medians[FP32] or 1.0
    rows = [{"config": c.name, "scheme": plans[c.name].scheme, "min_elements": c.min_elements,
             "per_token": c.per_token, "layers": c.layers, "quantized_elements": c.quantized_elements,
             "median_ms": round(medians[c.name] * 1e3, 4),
             "ratio_vs_fp32": round(medians[c.name] / base, 4)} for c in configs]
    log.info("w8a8 speed tuning %s (batch %d): %s -> %s", stage, batch,
             ", ".join(f"{r['config']} {r['ratio_vs_fp32']:.2f}x" for r in rows[1:]), chosen.name)
    plan = plans[chosen.name]
    return plan, {"batch": batch, "chosen": chosen.name, "scheme": plan.scheme,
                  "min_elements": chosen.min_elements, "per_token": chosen.per_token, "configs": rows}


TOP_K_MARGIN = 0.5
FULL_FP32 = (
    "split bundle: the full graph stays fp32. w8a8 quantizes activations per call (per tensor), "
    "so a row's score depends a little on the other rows of the call; the full graph serves "
    "whole merged calls, and on the bench RankMixer its w8a8 form failed the verdict's merged "
    "configuration (top-10 0.94 < 0.95) where the split path passed"
)


def selection_limits(limits: dict[str, float]) -> dict[str, float]:
    """The budget the selection aims at: top-k overlap minimums halfway (``TOP_K_MARGIN``) from
    the limit to 1. Per-tensor int8 activations reorder near-tied candidates; the held-out
    verdict judges top-10 on a few requests (10 by default), whose mean moves by a few 1e-2
    between samples: measured on the bench RankMixer (random init), a selection passing at
    0.97 on calibration rows gave 0.94-0.96 in the verdict against a 0.95 limit."""
    out = dict(limits)
    for key, value in limits.items():
        if key.startswith("top") and "overlap" in key and value < 1:
            out[key] = value + (1 - value) * TOP_K_MARGIN
    return out


def fixed_plan(stage: str, proto: onnx.ModelProto, weight_bits: int, min_elements: int,
               per_token: bool) -> tuple[_Plan, dict[str, Any]]:
    """Untimed: every eligible layer of a group (or unsplit full) stage in w8a8, the user stage fp32."""
    record = {"chosen": "fixed", "min_elements": min_elements, "per_token": per_token, "configs": []}
    if stage == "user":
        return _Plan(stage, "fp32", None, [], 0, weight_bits), {**record, "scheme": "fp32"}
    canon = _canonical(stage, proto, min_elements, unroll=per_token)
    names = linear_layers(ir.serde.deserialize_model(canon), min_elements=min_elements)
    return _Plan(stage, W8A8, canon, names, min_elements, weight_bits), {**record, "scheme": W8A8}


def quantize_w8a8(stages: dict[str, onnx.ModelProto], spec: Any, *, calibration=None,
                  limits: dict[str, float], threads: int | None = None, weight_bits: int = 8,
                  tune: bool = True, min_elements: int = 0,
                  per_token_stages: tuple[str, ...] = ()) -> tuple[dict[str, onnx.ModelProto], dict[str, Any]]:
    """(stage -> quantized proto, manifest ``quantization``) for precision w8a8 (module doc).

    ``tune`` False: no timing; ``fixed_plan`` per stage (``min_elements``, per-token weights
    unrolled in ``per_token_stages``)."""
    tuning: dict[str, Any] = {"cpu": timing.cpu_name(), "threads": threads or "onnxruntime default",
                              "weight_bits": weight_bits, "timed": tune, "stages": {}}
    plans: dict[str, _Plan] = {}
    split = {"user", "group"} <= set(stages)
    for stage in (s for s in ("user", "group", "full") if s in stages):
        if stage == "full" and split:  # the served path is user+group: full stays fp32
            plans[stage] = _Plan(stage, "fp32", None, [], 0, weight_bits)
            tuning["stages"][stage] = {"chosen": FP32, "scheme": "fp32", "min_elements": None,
                                       "per_token": False, "configs": [], "why": FULL_FP32}
        elif tune:
            plans[stage], tuning["stages"][stage] = tune_stage(
                stage, stages[stage], weight_bits, threads, w8a16_too=stage == "user")
        else:
            plans[stage], tuning["stages"][stage] = fixed_plan(
                stage, stages[stage], weight_bits, min_elements, stage in per_token_stages)
    # the stages as exported are fixed: their outputs (the user side) are computed once
    runner = _Runner(calibration, spec, stages.values()) if calibration is not None else None
    select_limits = selection_limits(limits)
    out: dict[str, onnx.ModelProto] = {}
    layers: list[dict[str, Any]] = []
    outcome: dict[str, Any] = {}
    prior: dict[str, Any] = {"keep": set(), "table": {}}  # the split path's findings, by bare name
    for path in ([("user", "group")] if split else []) + [("full",)]:
        keep, table, result = _select(path, plans, stages, runner, select_limits, prior)
        prior = {"keep": {_bare(g) for g in keep}, "table": {_bare(g): v for g, v in table.items()}}
        for s in path:
            kept_names = {n for n in plans[s].names if f"{s}:{group_of(n)}" in keep}
            out[s] = plans[s].build(stages[s], only=set(plans[s].names) - kept_names)
        layers += _layer_rows(path, plans, keep, table)
        if result is not None:
            outcome["+".join(path)] = result
    if not any(p.names for p in plans.values()):
        log.warning("w8a8: no stage quantized (fp32 fastest, or no eligible layer)")
    scheme = {s: {"scheme": p.scheme, "kernel": KERNELS.get(p.scheme, "fp32 MatMul/Gemm"),
                  "layers": len(p.names), "min_elements": p.min_elements,
                  "per_token_unrolled": tuning["stages"][s]["per_token"]} for s, p in plans.items()}
    record: dict[str, Any] = {
        "precision": W8A8,
        "scheme": {"stages": scheme, "weights": "int8 symmetric per output channel"
                   + (" in a 7-bit range (reduce range: u8s8 without VNNI saturates int16)"
                      if weight_bits == 7 else ""),
                   "activations": "w8a8: uint8 asymmetric per tensor, computed per call; "
                   "w8a16: int8 blocks inside MatMulNBits (accuracy_level 4)",
                   "weight_bits": weight_bits, "target": "ort-cpu",
                   # the export CPU's int8 dot product decided weight_bits; runtime.load warns
                   # when 8-bit weights are served where u8s8 can saturate (runtime/cpu.py)
                   "int8_dot": timing.cpu_summary()["int8_dot"]},
        "passes": ["canonicalize_linear", "DynamicQuantizeMatMulPass | QuantizeWeightsInt8Pass+LowerToMatMulNBitsPass"],
        "budget": limits if runner else None,
        "selection_limits": select_limits if runner else None,
        "speed_tuning": tuning,
        "outcome": outcome,
        "layers": layers,
        "kept_float": [r["name"] for r in layers if r["why"].startswith("accuracy")],
        "kept_float_for_speed": [r["name"] for r in layers if r["why"].startswith("speed")],
        "refusals": [],
        "weight_bytes": {k: _bytes(stages[k], out[k]) for k in out},
    }
    return out, record


def _bare(group: str) -> str:
    return group.split(":", 1)[1]


def _select(path, plans, stages, runner, limits, prior):
    """(groups kept float, per-group effects, outcome) of one serving path (module doc, step 3).

    ``prior`` (the split path's kept set and effects, by bare layer name): the full graph
    holds the same layers, so their float set is tried first and their effects reused."""
    groups = sorted({f"{s}:{group_of(n)}" for s in path for n in plans[s].names})
    if runner is None or not groups:
        return set(), {}, None

    def protos(keep: set[str] = frozenset(), only: set[str] | None = None):
        out = {}
        for s in path:
            sel = {n for n in plans[s].names if f"{s}:{group_of(n)}" not in keep
                   and (only is None or f"{s}:{group_of(n)}" in only)}
            out[s] = plans[s].build(stages[s], only=sel)
        return out

    everything = runner.measure(protos(), limits)
    result: dict[str, Any] = {"all_quantized": everything}
    keep: list[str] = []
    current, table = everything, {}
    hinted = [g for g in groups if _bare(g) in prior["keep"]]
    if hinted and not everything["passed"]:
        trial = runner.measure(protos(keep=set(hinted)), limits)
        if trial["passed"]:
            keep, current = hinted, trial
    if not current["passed"]:
        for g in groups:
            table[g] = prior["table"].get(_bare(g)) or runner.measure(protos(only={g}), limits)
        ranked = sorted(groups, key=lambda g: budget_damage(table[g], limits), reverse=True)
        lo, hi, tried = 0, len(ranked), {}
        while hi - lo > 1:
            mid = (lo + hi) // 2
            tried[mid] = runner.measure(protos(keep=set(ranked[:mid])), limits)
            lo, hi = (lo, mid) if tried[mid]["passed"] else (mid, hi)
        if hi not in tried:
            tried[hi] = runner.measure(protos(keep=set(ranked[:hi])), limits)
        keep, current = ranked[:hi], tried[hi]
    result["selected"], result["kept_float"] = current, keep
    if not current["passed"]:
        log.warning("w8a8 of %s misses the budget: %s", "+".join(path), current["breaches"])
    return set(keep), table, result


def _layer_rows(path, plans, keep, table) -> list[dict[str, Any]]:
    rows = []
    for s in path:
        p = plans[s]
        for g in sorted({group_of(n) for n in p.names}):
            name = f"{s}:{g}"
            effect = table.get(name)
            rows.append({
                "name": name, "stage": s, "weights": sum(group_of(n) == g for n in p.names),
                "precision": "fp32" if name in keep else ("w8a8" if p.scheme == W8A8 else "int8"),
                "kernel": "fp32 MatMul" if name in keep else KERNELS[p.scheme].split(" (")[0],
                "why": "accuracy: kept in float by the selection to meet the budget" if name in keep
                else f"quantized ({p.scheme}, the stage's fastest configuration): within the budget",
                "effect": None if effect is None else {
                    k: v for o in effect["outputs"].values() for k, v in o.items()},
            })
    return rows


def step_quantize_w8a8(ctx: Any) -> None:
    """Pipeline step ``quantize`` for precision w8a8 (called by exporter.steps.quantize.step).

    Reads ``options.target`` (``trt`` is refused: the kernel is ORT CPU's), ``budgets``
    (entry ``w8a8``, default the w8a16 budget), ``serve_threads`` (timed with that many
    intra-op threads; None: ONNX Runtime's default) and ``quantize`` (QuantizeStepOptions:
    ``tune`` False (--no-quant-tune) = no timing, ``fixed_plan``: every layer of the group and
    full stages with at least ``min_elements`` (default 0) elements in w8a8, per-token weights
    unrolled in ``per_token_stages``, the user stage fp32).
    """
    o = ctx.options
    if o.target == "trt":
        raise ExportError("precision w8a8 runs ONNX Runtime CPU's DynamicQuantizeMatMul; "
                          "for --target trt use w8a16")
    from exporter.evaluate.budgets import DEFAULTS, load_budgets

    limits = dict(DEFAULTS[W8A8])
    if o.budgets:
        limits = load_budgets(o.budgets).for_stage("quantize", W8A8)
    n_parity, n_calib = ctx.row_budget()
    scope = ctx.manifest_fields.get("row_scope")
    scoped = scope is not None and scope.full == "request"
    calib = calibration_for(ctx.loaded.eager(), ctx.spec, o.data, skip_rows=n_parity,
                            n_rows=n_calib, seed=o.seed, request_scoped=scoped)
    if ctx.store_rows is not None:
        calib.rows = ctx.store_rows(calib.rows)
    calib.heldout_rows = n_parity
    bits = weight_bits_for_cpu(timing.cpu_flags())
    q = o.quantize
    stages, record = quantize_w8a8(
        ctx.stages, ctx.graph_spec, calibration=calib, limits=limits, threads=o.serve_threads,
        weight_bits=bits, tune=bool(q.tune), min_elements=int(q.min_elements or 0),
        per_token_stages=tuple(q.per_token_stages or ()))
    ctx.stages.update(stages)
    ctx.manifest_fields["quantization"] = Quantization.from_dict(record, "quantize step (w8a8)")
    if scope is not None:
        mark_call_scoped(scope, stages, split={"user", "group"} <= set(ctx.stages))


CALL_RANGE = ("w8a8: activations are quantized with one range per tensor, computed per call, so "
              "a row's score depends a little on the other rows of the call")


def mark_call_scoped(scope: Any, stages: dict[str, onnx.ModelProto], *, split: bool) -> None:
    """A served stage with DynamicQuantizeMatMul mixes the rows of its call: record it in
    ``manifest.row_scope`` ("request"), so the runtime never merges two requests into one call
    of it and a request's scores never depend on another request's candidates."""
    side = "group" if split else "full"
    nodes = [n.name for n in stages[side].graph.node if n.op_type == "DynamicQuantizeMatMul"]
    if not nodes:
        return
    setattr(scope, side, "request")
    scope.mixing.append(RowMixing(op="DynamicQuantizeMatMul", node=nodes[0], reason=CALL_RANGE,
                                  source=None))
    log.info("w8a8: the %s stage is request-scoped (%d DynamicQuantizeMatMul)", side, len(nodes))
