"""Quantize step, job 6: choose each stage's speed configuration by timing it on this CPU."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import onnx
import onnx_ir as ir

from exporter import timing
from exporter.steps.quantize.build import _canonical, _quantize_canonical
from exporter.steps.quantize.options import QuantizeOptions
from exporter.steps.quantize.small import _tune_small_group
from exporter.steps.quantize.speed import FP32, quantized_elements, tune_stage
from graph_passes.onnx import linear_layers
from runtime.manifest import SMALL_GROUP as SMALL

log = logging.getLogger(__name__)


def tune_for_speed(
    stages: dict[str, onnx.ModelProto], opts: QuantizeOptions
) -> tuple[QuantizeOptions, dict[str, Any]]:
    """Pick each stage's speed configuration by timing it on this CPU (exporter.steps.quantize.speed, exporter.timing).

    Returns the options with the chosen per-stage ``min_elements``, ``per_token_stages`` and
    ``stages`` (a stage whose fp32 graph is fastest is not quantized) and the record for
    ``manifest.quantization.speed_tuning``. When no stage is faster quantized, each stage
    takes its fastest quantized configuration (the bundle is quantized for size) and the
    record and a warning say so.
    """
    record: dict[str, Any] = {
        "cpu": timing.cpu_name(),
        "threads": opts.tune_threads or "onnxruntime default",
        "accuracy_level": opts.accuracy_level,
        "stages": {},
    }
    builders = {}
    for stage in (s for s in ("user", "group", "full") if s in stages and s in opts.stages):
        builders[stage] = _config_builder(stage, stages[stage], opts)
        record["stages"][stage] = tune_stage(
            stage, stages[stage], builders[stage], threads=opts.tune_threads
        )
    tuned = record["stages"]
    if tuned and all(r["chosen"] == FP32 for r in tuned.values()):
        fallback = {s: r for s, r in tuned.items() if r["fastest_quantized"] is not None}
        for r in fallback.values():
            row = next(c for c in r["configs"] if c["config"] == r["fastest_quantized"])
            r.update(chosen=row["config"], min_elements=row["min_elements"], per_token=row["per_token"])
        record["fallback"] = (
            f"{opts.precision} is slower than fp32 on this CPU in every stage: each stage "
            "takes its fastest quantized configuration (quantized for size)"
        )
        log.warning("speed tuning: %s", record["fallback"])
    small_rows = 0
    if "group" in builders and opts.small_batch != 0:
        small_rows, tuned[SMALL] = _tune_small_group(stages["group"], builders["group"], tuned["group"], opts)
    chosen = {s: r for s, r in tuned.items() if r["chosen"] != FP32}
    if not small_rows:
        chosen.pop(SMALL, None)
    tuned_opts = dataclasses.replace(
        opts,
        stages=tuple(s for s in opts.stages if s in chosen or s not in tuned)
        + ((SMALL,) if small_rows else ()),
        per_token_stages=tuple(s for s, r in chosen.items() if r["per_token"]),
        stage_min_elements={s: int(r["min_elements"]) for s, r in chosen.items()},
        tune=False,
        group_small_rows=small_rows,
    )
    return tuned_opts, record


def _config_builder(stage: str, proto: onnx.ModelProto, opts: QuantizeOptions):
    """``build(min_elements, per_token)`` for ``tune_stage``, memoised (the small-batch
    tuning of the group stage times the same configurations again)."""
    memo: dict[tuple[int, bool], Any] = {}

    def build(m: int, per_token: bool):
        if (m, per_token) not in memo:
            canon = _canonical(stage, proto, m, unroll=per_token)
            names = linear_layers(ir.serde.deserialize_model(canon), min_elements=m)
            memo[m, per_token] = None
            if names:
                q = ir.serde.serialize_model(_quantize_canonical(canon, opts, names, m).model)
                memo[m, per_token] = (q, names, quantized_elements(canon, names))
        return memo[m, per_token]

    return build
