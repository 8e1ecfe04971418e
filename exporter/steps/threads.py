"""Intra-op threads per small-batch stage: timed on the final graphs, not assumed.

A split bundle runs its user graph once per distinct user (batch 1 in the common request)
and its ``group_small`` graph for calls of a few candidates. At that size a graph of many
small kernels can run faster on fewer intra-op threads than the bundle is served with:
ONNX Runtime splits each node's work across its pool, and with spinning off (the runtime's
default, ``runtime.backends.ort.OrtBackend``) every parallel node wakes a sleeping worker.
Measured on the bench RankMixer (AMD EPYC Zen 5, 2 cores, ORT 1.32, one request = user
graph + group graph at N=1, interleaved with the fp32 bundle):

    fp32 bundle, 2 threads                       1.00x
    fp32 bundle, 1 thread                        1.07x cold / 1.16x warm
    w8a16 bundle, 2 threads                      0.85x / 0.77x
    w8a16 bundle, user and group_small 1 thread  0.71x / 0.65x

(int8 MatMulNBits nodes are ~4x less work per node than their fp32 MatMuls, so splitting
them pays less than the wake-up costs; the fp32 graphs still gain from the second thread.)

So, as for the per-token layout and the w8a16 configurations, the export times it: each
small-batch stage's final graph (``SMALL_STAGES``) at batch 1 with the serving thread count
and with each smaller power of two, interleaved rounds, medians (``timing.time_configs``),
and records the fastest as ``manifest.stages[stage].intra_op_threads`` when it is fewer
than the serving threads. The runtime's CPU backend opens that stage's session with at most
that many threads. When ``group_small`` moves to fewer threads, its crossover against the
group graph (at the serving threads) is timed again: fewer threads scale worse with N.
Stages that serve large batches (group, full) keep the serving threads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import onnx

from exporter import timing
from exporter.args import StepOptions, arg
from runtime.manifest import SMALL_GROUP, Optimize
from runtime.manifest.tuning import StageThreads

if TYPE_CHECKING:
    from exporter.pipeline import ExportContext

log = logging.getLogger(__name__)

SMALL_STAGES = ("user", SMALL_GROUP)
DEFAULT = "onnxruntime default"


def thread_options(serve_threads: int | None, cpus: int | None = None) -> list[int | None]:
    """The thread counts timed: the serving threads first (None: ORT's default, about one per
    core), then each smaller power of two down to 1."""
    top = serve_threads or cpus or os.cpu_count() or 1
    smaller = [1 << i for i in range(top.bit_length()) if (1 << i) < top]
    return [serve_threads, *sorted(smaller, reverse=True)]


def pick(medians: Mapping[int | None, float]) -> int | None:
    """The fastest thread count; on an exact tie the one listed first (more threads)."""
    best = min(medians.values())
    return next(t for t, m in medians.items() if m == best)


def _label(threads: int | None) -> str:
    return DEFAULT if threads is None else str(threads)


def choose_stage_threads(
    stages: Mapping[str, onnx.ModelProto],
    serve_threads: int | None,
    *,
    group_small_rows: int = 0,
    forced_small_rows: bool = False,
) -> tuple[dict[str, int], int, dict[str, Any]]:
    """(``{stage: threads}`` for the small-batch stages that run faster on fewer threads,
    the group_small ``max_rows`` to use, the record for ``manifest.stage_threads``).

    ``group_small_rows``: the crossover timed at the serving threads; when group_small moves
    to fewer threads it is timed again against ``group`` (unless ``forced_small_rows``: the
    user fixed it), and if group_small then loses even at N=1 it keeps the serving threads.
    """
    options = thread_options(serve_threads)
    record: dict[str, Any] = {
        "cpu": timing.cpu_name(),
        "serve_threads": _label(serve_threads),
        "stages": {},
    }
    chosen: dict[str, int] = {}
    rows = group_small_rows
    if len(options) < 2:
        record["why"] = "served with 1 thread: nothing to choose"
        return chosen, rows, record
    for stage in (s for s in SMALL_STAGES if s in stages):
        configs = [
            timing.Config(f"threads={_label(t)}", None, False, stages[stage], threads=t)
            for t in options
        ]
        med = timing.time_configs(configs, timing.SMALL_BATCH, threads=serve_threads)
        medians = {t: med[c.name] for t, c in zip(options, configs, strict=True)}
        best = pick(medians)
        entry: dict[str, Any] = {
            "batch": timing.SMALL_BATCH,
            "median_ms": {_label(t): round(m * 1e3, 4) for t, m in medians.items()},
            "chosen": _label(best),
        }
        if best != serve_threads and stage == SMALL_GROUP and "group" in stages:
            best, rows = _retime_small(stages, serve_threads, best, rows, forced_small_rows, entry)
        if best != serve_threads:  # options[0] is the serving count: any other is fewer
            chosen[stage] = best
        record["stages"][stage] = entry
        log.info(
            "stage threads %s (batch %d): %s -> %s",
            stage,
            timing.SMALL_BATCH,
            ", ".join(f"{k} {v:.3f} ms" for k, v in entry["median_ms"].items()),
            entry["chosen"],
        )
    return chosen, rows, record


def _retime_small(
    stages: Mapping[str, onnx.ModelProto],
    serve_threads: int | None,
    best: int,
    rows: int,
    forced: bool,
    entry: dict[str, Any],
) -> tuple[int | None, int]:
    """(threads, max_rows) for group_small once it ran faster on ``best`` threads: its
    crossover against ``group`` (serving threads) timed again on them, unless ``forced``;
    if it then loses at N=1 it keeps the serving threads and ``rows``. Fills ``entry``."""
    if forced:
        entry["max_rows"] = rows
        entry["why"] = f"max_rows {rows} was given (--quant-small-batch): not re-timed"
        return best, rows
    new_rows, timings = timing.crossover(
        stages[SMALL_GROUP], stages["group"], threads=serve_threads, small_threads=best
    )
    entry.update(crossover=timings, max_rows=new_rows)
    if new_rows:
        return best, new_rows
    entry["why"] = f"on {best} thread(s) it lost to the group graph at N=1: keeps the serving threads"
    entry["chosen"] = _label(serve_threads)
    return serve_threads, rows


@dataclass
class ThreadsOptions(StepOptions):
    """Step ``threads``: whether the small-batch stages are timed on fewer threads."""

    enabled: bool = arg("--no-stage-threads", default=True, action="store_false",
                        help="do not time the small-batch stages on fewer threads: every stage runs on "
                        "the serving threads")


def step_stage_threads(ctx: ExportContext) -> None:
    """Pipeline step (exporter.pipeline), ONNX Runtime CPU targets only: time the final
    small-batch stages (after quantization, the graphs as written) and record the choice.
    Reads ``options.serve_threads`` (None: ORT's default), ``options.threads.enabled``
    (False: skip) and ``options.quantize.small_batch`` (> 0: group_small's max_rows was forced)."""
    o = ctx.options
    if o.target == "trt" or not o.threads.enabled:
        return
    if not any(s in ctx.stages for s in SMALL_STAGES):
        return
    small = ctx.stage_meta.get(SMALL_GROUP, {})
    chosen, rows, record = choose_stage_threads(
        ctx.stages,
        o.serve_threads,
        group_small_rows=int(small.get("max_rows", 0)),
        forced_small_rows=bool(o.quantize.small_batch),
    )
    from exporter.steps.graph_record import set_stage_threads

    for stage, threads in chosen.items():
        ctx.stage_meta.setdefault(stage, {})["intra_op_threads"] = threads
        if any(ctx.stages[o] is ctx.stages[stage] for o in ctx.stages if o != stage):
            ctx.stages[stage] = onnx.ModelProto.FromString(ctx.stages[stage].SerializeToString())
        set_stage_threads(ctx.stages[stage], threads)  # the graph carries it; the manifest reads it
    if SMALL_GROUP in ctx.stage_meta:
        ctx.stage_meta[SMALL_GROUP]["max_rows"] = rows
    opt = ctx.manifest_fields.setdefault("optimize", Optimize())
    opt.stage_threads = StageThreads.from_dict(record, "threads step", "optimize.stage_threads")
