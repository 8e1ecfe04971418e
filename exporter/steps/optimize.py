"""Pipeline step ``optimize``: numerics-preserving ONNX rewrites on every stage, every precision.

Runs after ``split`` and before ``quantize``, on full.onnx and user/group alike, so the
baseline the split is measured against gets the same optimisation (a fair comparison) and
the quantizer starts from the graphs that are served. The rewrites themselves live in
``graph_passes.onnx.optimize_inference``; this step only converts and reports.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from exporter import timing
from exporter.args import StepOptions, arg
from exporter.steps.moe_form import choose_moe_form
from graph_passes.onnx import PASS_KEY, optimize_inference
from runtime.manifest import Optimize
from runtime.manifest.tuning import LayoutChoice, MoeForm

if TYPE_CHECKING:
    from exporter.pipeline import ExportContext

log = logging.getLogger(__name__)


def optimize_stage(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """``proto`` after ``optimize_inference``, and how many nodes each pass created."""
    model = ir.serde.deserialize_model(proto)
    result = optimize_inference(model)
    if not result.modified:
        return proto, {}
    made = Counter(
        n.metadata_props[PASS_KEY] for n in result.model.graph if PASS_KEY in n.metadata_props
    )
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out)
    return out, dict(made)


def unrolled_fp32(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """``proto`` with its per-token weights ``W[T, D, H]`` unrolled into T 2-D MatMuls (and
    Gemms as MatMul + Add: ONNX Runtime fuses them back, with bias and ReLU, into one GEMM);
    None when it has none. Numerically the same layers, fp32."""
    from graph_passes.onnx import (
        UnrollBatchedMatMulPass,
        UnrollPerTokenChainPass,
        canonicalize_linear,
    )

    model = ir.serde.deserialize_model(proto)
    canonicalize_linear(model, unroll_batched=True, unroll_min_elements=0)
    unroll_passes = {UnrollPerTokenChainPass.__name__, UnrollBatchedMatMulPass.__name__}
    unrolled = any(n.metadata_props.get(PASS_KEY) in unroll_passes for n in model.graph)
    if not unrolled:
        return None
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out)
    return out


def choose_per_token_layout(
    stage: str, proto: onnx.ModelProto, threads: tuple[int | None, ...] = (1, None)
) -> tuple[onnx.ModelProto, dict | None]:
    """The faster of the stage as exported (per-token weights as one batched MatMul) and
    ``unrolled_fp32`` on ONNX Runtime CPU, timed at the stage's batch (exporter.timing)
    with each intra-op thread count in ``threads`` (None: ONNX Runtime's default); unrolled
    wins when the geometric mean of its time ratios is below 1.

    Which wins depends on the CPU, the batch and the threads, so it is timed, not assumed. On
    an AMD EPYC (Zen 3), bench RankMixer group graph: unrolled 0.89x the batched time at
    N=256 on one thread, 0.98-0.99x on two; the user graph at batch 1 on two threads 1.15x.
    """
    unrolled = unrolled_fp32(proto)
    if unrolled is None:
        return proto, None
    batch = timing.stage_batch(stage)
    configs = [
        timing.Config("batched", None, False, proto),
        timing.Config("unrolled", None, True, unrolled),
    ]
    timed = {}
    for t in dict.fromkeys(threads):
        medians = timing.time_configs(configs, batch, threads=t)
        timed["default" if t is None else str(t)] = {
            "batched_ms": round(medians["batched"] * 1e3, 4),
            "unrolled_ms": round(medians["unrolled"] * 1e3, 4),
            "ratio": round(medians["unrolled"] / medians["batched"], 4),
        }
    score = float(np.exp(np.mean([np.log(v["ratio"]) for v in timed.values()])))
    chosen = "unrolled" if score < 1.0 else "batched"
    record = {"batch": batch, "threads": timed, "unrolled_vs_batched": round(score, 4), "chosen": chosen}
    log.info(
        "optimize %s: per-token weights %s (unrolled/batched %.2fx at batch %d; %s)",
        stage, chosen, score, batch,
        ", ".join(f"{k} thread(s) {v['ratio']:.2f}x" for k, v in timed.items()),
    )
    return (unrolled if chosen == "unrolled" else proto), record


@dataclass
class OptimizeOptions(StepOptions):
    """Step ``optimize``: the layouts and MoE forms timed (or fixed) per stage."""

    moe_form: str | None = arg("--moe-form", default=None, choices=["gather", "grouped", "padded", "dense", "fused"],
                               help="sparse MoE models: run every expert bank in this form (default: the "
                               "sparse forms timed per stage; dense = every expert with a mask, the baseline; fused = "
                               "ONNX Runtime's com.microsoft.MoE)")
    per_token_layout: bool = arg("--no-per-token-layout", default=True, action="store_false",
                                 help="keep per-token weights as one batched MatMul instead of timing it "
                                 "against the unrolled 2-D MatMuls per stage on this CPU")


def step_optimize(ctx: ExportContext) -> None:
    """Rewrite every stage in ``ctx.stages`` in place (see the module docstring): sparse MoE
    expert banks into the form timed fastest for the stage (exporter.steps.moe_form; recorded in
    ``optimize.moe_form``), then the inference rewrites; for ONNX
    Runtime (not ``--target trt``, whose tactics TensorRT times itself on the GPU) keep each
    stage's per-token weights batched or unrolled, whichever ran faster here
    (``choose_per_token_layout``; ``OptimizeOptions.per_token_layout`` False keeps them batched).
    ``options.serve_threads`` = N times the layouts with N intra-op threads only (the thread
    count the bundle will be served with); without it, 1 thread and ONNX Runtime's default
    are both timed and their geometric mean decides (the better layout can differ between
    them: bench RankMixer group graph on an EPYC Zen 5, unrolled 0.91x at 1 thread, 1.08x at 2)."""
    o = ctx.options
    tune = o.target != "trt" and o.optimize.per_token_layout
    threads = (int(o.serve_threads),) if o.serve_threads else (1, None)
    layouts, moe = {}, {}
    for stage, proto in list(ctx.stages.items()):
        # sparse MoE banks first (their matcher reads the graph as exported): form per stage
        proto, moe_record = choose_moe_form(stage, proto, o.optimize.moe_form, target=o.target, threads=threads)
        if moe_record is not None:
            moe[stage] = moe_record
        ctx.stages[stage], made = optimize_stage(proto)
        if made:
            log.info("optimize %s: %s", stage, made)
        if tune:
            ctx.stages[stage], record = choose_per_token_layout(
                stage, ctx.stages[stage], threads=threads
            )
            if record is not None:
                layouts[stage] = record
    if layouts or moe:
        ctx.manifest_fields["optimize"] = Optimize(
            per_token_layout={s: LayoutChoice.from_dict(r, "optimize step", s) for s, r in layouts.items()},
            cpu=timing.cpu_name(),
            serve_threads=o.serve_threads,  # None: timed at 1 and ORT's default
            moe_form={s: MoeForm.from_dict(r, "optimize step", s) for s, r in moe.items()} or None,
        )
