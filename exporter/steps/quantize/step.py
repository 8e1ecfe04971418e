"""Quantize step: the pipeline function (exporter.pipeline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from exporter.steps.quantize.bundle import quantize_bundle_stages
from exporter.steps.quantize.calibrate import calibration_for
from exporter.steps.quantize.options import QuantizeOptions
from runtime.manifest import SMALL_GROUP as SMALL

if TYPE_CHECKING:
    from exporter.pipeline import ExportContext


def step_quantize(ctx: ExportContext) -> None:
    """Pipeline step (exporter.pipeline): quantize ctx.stages per ctx.options.precision.

    Reads ``options.extra``: ``target`` ("onnx" -> ORT CPU MatMulNBits, "trt" -> fp16
    activations for TensorRT), ``budgets`` (the parity budgets file; its entry for the
    precision is the selection budget), optional ``quant_block_size`` / ``quant_accuracy_level``
    / ``quant_stages`` (e.g. ["user"]) / ``quant_min_elements`` / ``quant_per_token_stages``
    (None: timed per stage on this CPU for ort-cpu, ``tune_for_speed``) / ``quant_tune``
    (False: the fixed ``TARGET_DEFAULTS`` instead of timing) / ``quant_small_batch``
    (``QuantizeOptions.small_batch``: None timed, 0 off, K forced) / ``serve_threads`` (the
    intra-op threads the bundle will be served with: the speed choices are timed with them;
    None: ONNX Runtime's default).
    """
    o = ctx.options
    if o.precision == "fp32":
        return
    extra = o.extra or {}
    budget = None
    if extra.get("budgets"):
        from exporter.evaluate.budgets import load_budgets

        budget = load_budgets(extra["budgets"]).for_stage("quantize", o.precision)
    opts = QuantizeOptions(
        precision=o.precision,
        target="gpu" if extra.get("target") == "trt" else "ort-cpu",
        block_size=extra.get("quant_block_size"),
        accuracy_level=int(extra.get("quant_accuracy_level", 4)),
        budget=budget,
        stages=tuple(extra.get("quant_stages") or ("full", "user", "group")),
        min_elements=extra.get("quant_min_elements"),
        per_token_stages=(
            None
            if extra.get("quant_per_token_stages") is None
            else tuple(extra["quant_per_token_stages"])
        ),
        tune=None if extra.get("quant_tune", True) else False,
        small_batch=extra.get("quant_small_batch"),
        tune_threads=extra.get("serve_threads"),
    )
    n_parity, n_calib = ctx.row_budget()
    scoped = (ctx.manifest_fields.get("row_scope") or {}).get("full") == "request"
    calib = calibration_for(
        ctx.loaded.eager(),
        ctx.spec,
        o.data,
        skip_rows=n_parity,
        n_rows=n_calib,
        seed=o.seed,
        request_scoped=scoped,
    )
    if ctx.store_rows is not None:  # cut tables: the stages read the store's rows
        calib.rows = ctx.store_rows(calib.rows)
    calib.heldout_rows = n_parity
    stages, record = quantize_bundle_stages(ctx.stages, ctx.graph_spec, options=opts, calibration=calib)
    ctx.stages.update(stages)
    if SMALL in stages:
        ctx.stage_meta[SMALL] = {"max_rows": record[SMALL]["max_rows"]}
    ctx.manifest_fields["quantization"] = record
