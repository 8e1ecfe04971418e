"""Quantize step: the pipeline function (exporter.pipeline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from exporter.steps.quantize.bundle import quantize_bundle_stages
from exporter.steps.quantize.calibrate import calibration_for
from runtime.manifest import SMALL_GROUP as SMALL
from runtime.manifest import Quantization

if TYPE_CHECKING:
    from exporter.pipeline import ExportContext


def step_quantize(ctx: ExportContext) -> None:
    """Pipeline step (exporter.pipeline): quantize ctx.stages per ctx.options.precision.

    Reads ``options.quantize`` (QuantizeStepOptions: the CLI's --quant-* flags), ``target``
    ("onnx" -> ORT CPU MatMulNBits, "trt" -> fp16 activations for TensorRT), ``budgets``
    (the parity budgets file; its entry for the precision is the selection budget) and
    ``serve_threads`` (the intra-op threads the bundle will be served with: the speed choices
    are timed with them; None: ONNX Runtime's default).
    """
    o = ctx.options
    if o.precision == "fp32":
        return
    if o.precision == "w8a8":  # int8 activations too: its own job (exporter/steps/quantize/w8a8.py)
        from exporter.steps.quantize.w8a8 import step_quantize_w8a8

        return step_quantize_w8a8(ctx)
    budget = None
    if o.budgets:
        from exporter.evaluate.budgets import load_budgets

        budget = load_budgets(o.budgets).for_stage("quantize", o.precision)
    opts = o.quantize.resolve(o.precision, target=o.target, budget=budget, threads=o.serve_threads)
    n_parity, n_calib = ctx.row_budget()
    scope = ctx.manifest_fields.get("row_scope")
    scoped = scope is not None and scope.full == "request"
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
    ctx.manifest_fields["quantization"] = Quantization.from_dict(record, "quantize step")
