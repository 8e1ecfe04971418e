"""Quantize step: the ``group_small`` stage (a second group graph for calls of few candidates).

A group graph serves any candidate count, and what pays at N=256 (often: fp32 GEMM) loses
at N=1. The group stage is also tuned at batch 1 (``exporter.timing.SMALL_BATCH``); when
that choice differs and runs faster, both graphs are timed at growing N
(``exporter.timing.crossover``) and the bundle gets a ``group_small`` stage serving calls up
to the last N where it still won (the runtime picks the graph per call).
"""

from __future__ import annotations

from typing import Any

import onnx

from exporter import timing
from exporter.steps.quantize.build import _Path
from exporter.steps.quantize.options import QuantizeOptions
from exporter.steps.quantize.select import _bare
from exporter.steps.quantize.speed import FP32, tune_stage
from runtime.manifest import SMALL_GROUP as SMALL


def _tune_small_group(
    proto: onnx.ModelProto, build, large: dict[str, Any], opts: QuantizeOptions
) -> tuple[int, dict[str, Any]]:
    """(max_rows of a ``group_small`` stage, 0 for none; its tuning record).

    The group graph's configurations timed again at ``SMALL_BATCH`` candidates; if another
    one than the large-batch choice wins there, both graphs are timed at growing N and the
    small graph serves calls up to the crossover. ``opts.small_batch`` K > 0 forces the
    stage (the configuration fastest at batch 1 among the quantized ones) for up to K."""
    rec = tune_stage(
        SMALL, proto, build, batch=timing.SMALL_BATCH, threads=opts.tune_threads
    )
    if opts.small_batch:  # forced: the fastest quantized configuration at batch 1
        name = rec["chosen"] if rec["chosen"] != FP32 else rec["fastest_quantized"]
        if name is None:
            rec["why"] = "the group stage has no layer to quantize"
            return 0, rec
        row = next(c for c in rec["configs"] if c["config"] == name)
        rec.update(chosen=name, min_elements=row["min_elements"], per_token=row["per_token"])
        rec.update(max_rows=int(opts.small_batch), why=f"forced (small_batch={opts.small_batch})")
        return int(opts.small_batch), rec
    if rec["chosen"] in (FP32, large["chosen"]):
        rec["why"] = (
            f"at batch {timing.SMALL_BATCH} the choice is {rec['chosen']}, as for large "
            "calls: one group graph serves every call"
            if rec["chosen"] == large["chosen"]
            else f"fp32 is fastest at batch {timing.SMALL_BATCH} too"
        )
        rec["max_rows"] = 0
        return 0, rec
    small_proto = build(int(rec["min_elements"]), bool(rec["per_token"]))[0]
    large_proto = (
        proto
        if large["chosen"] == FP32
        else build(int(large["min_elements"]), bool(large["per_token"]))[0]
    )
    rows, timings = timing.crossover(small_proto, large_proto, threads=opts.tune_threads)
    rec.update(max_rows=rows, crossover=timings)
    rec["why"] = (
        f"{rec['chosen']} beats the large-batch choice ({large['chosen']}) up to {rows} "
        "candidates per call"
        if rows
        else f"{rec['chosen']} lost to the large-batch graph at N={timing.SMALL_BATCH} when "
        "timed against it"
    )
    return rows, rec


def build_small_group(run_path, out, stages, canonical, per_stage, runner, prior) -> bool:
    """Select and build ``group_small`` (quantize_bundle_stages' ``run_path``) on the user graph
    just chosen, as it will be served; False when every layer had to stay float (then it is
    the group graph again: not built)."""
    small = _Path(("user", SMALL), {"user": out["user"], SMALL: canonical[SMALL]}, (SMALL,), per_stage)
    if runner is not None:
        runner.fix(out["user"])
    originals = {"user": out["user"], SMALL: stages[SMALL]}
    kept = run_path(small, originals, prior, take=(SMALL,))["keep"]
    return not {_bare(g) for g in small.groups} <= kept
