"""Quantize step: ``quantize_bundle_stages``, the jobs in order for a bundle's stages."""

from __future__ import annotations

import logging
from typing import Any

import onnx

from exporter.errors import ExportError
from exporter.steps.quantize.build import _bytes, _canonical, _layer_rows, _Path
from exporter.steps.quantize.calibrate import Calibration
from exporter.steps.quantize.options import PASSES, QuantizeOptions
from exporter.steps.quantize.runner import _Runner
from exporter.steps.quantize.select import _bare, _select
from exporter.steps.quantize.small import build_small_group
from exporter.steps.quantize.tune import tune_for_speed
from runtime.manifest import SMALL_GROUP as SMALL

log = logging.getLogger(__name__)


def quantize_bundle_stages(
    stages: dict[str, onnx.ModelProto],
    spec: Any,
    *,
    options: QuantizeOptions | None = None,
    calibration: Calibration | None = None,
) -> tuple[dict[str, onnx.ModelProto], dict[str, Any]]:
    """Quantize a bundle's stages; returns (stage -> quantized proto, manifest ``quantization``).

    ``stages`` holds "full" and, when split, "user" and "group" (fp32 ONNX, as exported).
    Without ``calibration`` every quantizable layer is quantized and nothing is measured;
    with it, layers are selected against the budget as described in the module docstring.
    """
    opts = options or QuantizeOptions()
    tuning = None
    if opts.tune:
        opts, tuning = tune_for_speed(stages, opts)
    stages, canonical, per_stage, paths = _paths(stages, opts)
    runner = _Runner(calibration, spec, canonical.values()) if calibration is not None else None
    record: dict[str, Any] = {
        "precision": opts.precision,
        "scheme": opts.scheme(),
        "passes": PASSES[opts.target],
    }
    record["budget"] = opts.limits() if runner else None
    if tuning is not None:
        record["speed_tuning"] = tuning
    out: dict[str, onnx.ModelProto] = {}
    layers, refusals = [], []

    def run_path(path: _Path, originals, prior: dict[str, Any], take: tuple[str, ...] | None = None):
        """Select and build ``path``; its stages (or only those in ``take``) go to ``out``."""
        keep, table, outcome = _select(path, opts, runner, prior) if runner else (set(), {}, None)
        protos, refused = path.final_build(opts, originals, keep)
        out.update({k: v for k, v in protos.items() if take is None or k in take})
        refusals.extend(refused)
        layers.extend(_layer_rows(path, keep, table, opts))
        if outcome is not None:
            record.setdefault("outcome", {})["+".join(path.stages)] = outcome
        return {"keep": {_bare(g) for g in keep}, "table": {_bare(g): v for g, v in table.items()}}

    prior: dict[str, Any] = {}  # the split path's findings, reused for group_small and full
    for path in paths:
        found = run_path(path, stages, prior)
        if path.stages == ("user", "group"):
            prior = found
            if opts.group_small_rows and not build_small_group(run_path, out, stages, canonical, per_stage, runner, prior):
                del out[SMALL]  # every layer float: the group graph again
                layers[:] = [r for r in layers if r["stage"] != SMALL]
                log.warning("group_small: every layer had to stay float for accuracy; not built")
    if SMALL in out:
        record[SMALL] = {"max_rows": opts.group_small_rows}
    record["layers"] = layers
    record["kept_float"] = [r["name"] for r in layers if r["why"].startswith("accuracy")]
    record["kept_float_for_speed"] = [r["name"] for r in layers if r["why"].startswith("speed")]
    record["refusals"] = sorted(set(refusals))
    record["weight_bytes"] = {k: _bytes(stages[k], out[k]) for k in out}
    return out, record


def _paths(stages: dict[str, onnx.ModelProto], opts: QuantizeOptions):
    """(stages to quantize, their canonical graphs, min_elements per stage, serving paths);
    refuses a bundle in which no linear layer is worth quantizing. ``group_small`` (when
    tuning chose one) starts as the group graph, quantized its own way (opts.*_for(SMALL))."""
    stages = {k: v for k, v in stages.items() if k != SMALL}
    if opts.group_small_rows and {"user", "group"} <= set(stages):
        stages[SMALL] = stages["group"]
    canonical = {
        k: _canonical(k, v, opts.min_elements_for(k), unroll=k in opts.per_token_stages)
        for k, v in stages.items()
    }
    split = {"user", "group"} <= set(stages)
    per_stage = {k: opts.min_elements_for(k) for k in stages}
    quantized = tuple(s for s in opts.stages if s != SMALL)
    paths = [_Path(("user", "group"), canonical, quantized, per_stage)] if split else []
    paths.append(_Path(("full",), canonical, quantized, per_stage))
    if not any(p.groups for p in paths):
        small = sorted({w for p in paths for _, w, _ in p.small})
        raise ExportError(
            f"{opts.precision}: no linear layer is worth quantizing for target '{opts.target}' "
            f"({len(small)} layer(s) below min_elements={opts.min_elements} or per-token in a "
            f"stage outside per_token_stages={list(opts.per_token_stages)}: the measured speed "
            "choice keeps them fp32). Export fp32, or quantize them anyway with "
            "--quant-min-elements 0 --quant-per-token-stages full user group "
            "(smaller bundle; slower on ORT CPU)"
        )
    return stages, canonical, per_stage, paths
