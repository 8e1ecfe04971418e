"""Part of pipeline step ``optimize``: the execution form of each stage's sparse MoE banks.

A stage exported from a MoE student computes its expert banks in the gather form (the
student's eager forward: the k selected experts' weight slices gathered per row and token).
Which sparse form runs fastest depends on the batch: ``gather`` moves k weight slices per
row (best at the user side's M=1), ``grouped`` / ``padded`` read each expert's weights once
per call and run GEMMs over the rows that selected it (one GEMM per expert, or one batched
GEMM over experts padded to the largest group: best at N candidates), ``fused`` is ONE
``com.microsoft.MoE`` node per bank (ONNX Runtime's kernel: no weight slices copied, one node
whatever E is; measured best at M=1 on the bench student, and its W8A16 lowering QMoE reads
int8 weights in place). So, as for the
per-token layout (exporter.steps.optimize), each stage is rewritten into each and timed at its batch on ONNX
Runtime CPU (user 1, group/full 256), interleaved, medians; the faster is kept.

``--moe-form`` (``OptimizeOptions.moe_form``) fixes the form instead (``gather`` / ``grouped`` / ``padded`` / ``dense`` / ``fused``; dense is
the fallback and benchmark baseline, every expert with a mask). ``--target trt`` is not timed
here (no GPU at export): it gets ``trt_form`` (dense at E <= 8, where one batched GEMM over
all experts is cheap on a GPU and needs no data-dependent shapes; gather above), as the
TensorRT readiness check reports.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from exporter import timing
from graph_passes.onnx.moe import FORMS, SparseMoEFormPass
from graph_passes.onnx.moe_match import find_banks

log = logging.getLogger(__name__)

__all__ = ["apply_form", "choose_moe_form", "trt_form"]
TIMED_FORMS = ("gather", "grouped", "padded", "fused")
TRT_DENSE_MAX_EXPERTS = 8


def apply_form(proto: onnx.ModelProto, form: str) -> tuple[onnx.ModelProto, list[dict]]:
    """``proto`` with every expert bank in ``form``, and the banks' summaries."""
    model = ir.serde.deserialize_model(proto)
    moe = SparseMoEFormPass(form)
    result = moe(model)
    if not result.modified:
        return proto, []
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out)
    return out, moe.banks


def trt_form(banks: list[dict]) -> str:
    """The form a TensorRT build gets: dense when every bank has at most 8 experts."""
    small = all(b["experts"] <= TRT_DENSE_MAX_EXPERTS for b in banks)
    return "dense" if small else "gather"


def choose_moe_form(
    stage: str,
    proto: onnx.ModelProto,
    form: str | None = None,
    *,
    target: str = "onnx",
    threads: tuple[int | None, ...] = (1, None),
) -> tuple[onnx.ModelProto, dict | None]:
    """``proto`` with its banks in the chosen form and the manifest record (None: no banks).

    ``form`` fixes it (None: timed per stage; ``target`` "trt": ``trt_form``)."""
    banks, _ = find_banks(ir.serde.deserialize_model(proto).graph)
    if not banks:
        return proto, None
    fixed = form
    if fixed is not None and fixed not in FORMS:
        from exporter.errors import ExportError

        raise ExportError(f"--moe-form '{fixed}' is not one of {', '.join(FORMS)}")
    if target == "trt" and fixed is None:
        _, summary = apply_form(proto, "gather")
        fixed = trt_form(summary)
    if fixed is not None:
        out, summary = apply_form(proto, fixed)
        return out, {"form": fixed, "chosen_by": "option" if form else "trt",
                     "banks": summary}
    return _timed(stage, proto, threads)


def _timed(stage: str, proto: onnx.ModelProto, threads) -> tuple[onnx.ModelProto, dict]:
    built = {form: apply_form(proto, form) for form in TIMED_FORMS}
    configs = [timing.Config(f, None, False, built[f][0]) for f in TIMED_FORMS]
    batch = timing.stage_batch(stage)
    timed: dict[str, dict[str, float]] = {}
    for t in dict.fromkeys(threads):
        medians = timing.time_configs(configs, batch, threads=t, budget_s=2.0)
        timed["default" if t is None else str(t)] = {f"{f}_ms": round(medians[f] * 1e3, 4)
                                                       for f in TIMED_FORMS}
    score = {  # geometric mean over thread counts of each form's time / gather's
        f: float(np.exp(np.mean([np.log(v[f"{f}_ms"] / v["gather_ms"]) for v in timed.values()])))
        for f in TIMED_FORMS
    }
    form = min(TIMED_FORMS, key=lambda f: score[f])
    log.info("optimize %s: MoE banks in the %s form (%s at batch %d)", stage, form, timed, batch)
    return built[form][0], {
        "form": form,
        "chosen_by": "timed",
        "batch": batch,
        "threads": timed,
        "vs_gather": {f: round(v, 4) for f, v in score.items()},
        "banks": built[form][1],
    }
