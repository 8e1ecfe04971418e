"""The export pipeline: one plain list of steps, in order, each a function of the context.

    capture    torch.export with a dynamic batch dim on every input
    embeddings large embedding tables leave the graphs for a memory-mapped store in the
               bundle (exporter.steps.embeddings); the stages take the looked-up rows as inputs
    full-onnx  the unsplit model as full.onnx (the baseline, and the fallback)
    write      the bundle directory: ONNX files, manifest.json with every sha256
    split      UG split: user.onnx + group.onnx (exporter.steps.split); full.onnx stays the fallback
    row-scope  prove per side whether rows of a call stay apart (manifest.row_scope): a
               request-scoped bundle is never merged across requests by the runtime
    optimize   inference rewrites on every stage alike (per-token Einsum -> MatMul)
    quantize   w8a16/w4a16 weight-only passes with sensitivity-guided selection
    threads    ORT CPU: the small-batch stages' intra-op threads, timed (exporter.steps.threads)
    trt-lint   --target trt: refuse graphs TensorRT would reject, before anything is written
    write      the bundle directory: ONNX files, manifest.json with every sha256
    trt-build  --target trt: TensorRT engines for this GPU into the bundle
    parity     eager fp32 vs every compiled stage -> parity.json + manifest.parity

Held-out rows (``options.data``) are divided once, here: the first rows are the parity
rows, the tail is the quantizer's calibration set, so the parity verdict is measured on
rows the selection never saw.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from exporter.errors import ExportError
from exporter.load import LoadedModel
from exporter.progress import console
from exporter.steps.capture import capture, flat_input_names, to_torch_inputs
from exporter.steps.embeddings import step_embeddings
from exporter.steps.onnx_build import export_onnx
from exporter.steps.optimize import step_optimize
from exporter.steps.quantize import CALIBRATION_ROWS, step_quantize
from exporter.steps.tensorrt import step_trt_build, step_trt_lint
from exporter.steps.threads import step_stage_threads
from exporter.steps.write import BundleWriter
from runtime.manifest import DEFAULT_LIMITS, Flops, Limits, RowScope, Source, Split
from runtime.sample import sample_rows

log = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    """What the user asked for (CLI flags map one to one)."""

    precision: str = "fp32"
    split: bool = True
    parity: bool = True
    parity_rows: int | None = None  # None: all data rows but the calibration tail; 1000 sampled
    data: dict[str, np.ndarray] | None = None  # held-out rows (+ label, request_id)
    max_candidates: int = DEFAULT_LIMITS["max_candidates"]
    overwrite: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportContext:
    """State threaded through the steps; each step reads what earlier ones left."""

    loaded: LoadedModel
    out_dir: Path
    options: ExportOptions
    program: Any = None
    input_names: list[str] = field(default_factory=list)
    stages: dict[str, onnx.ModelProto] = field(default_factory=dict)
    stage_meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # Stage fields (max_rows, ...)
    manifest_fields: dict[str, Any] = field(default_factory=dict)  # Manifest field -> typed section
    extra_files: dict[str, Any] = field(default_factory=dict)
    parity_report: Any = None
    stage_spec: Any = None  # the compiled stages' inputs when the embedding step cut tables
    captured: Any = None  # the program as captured (before the embedding cut)
    store_rows: Any = None  # rows -> rows + the store's looked-up vectors (exporter.steps.embeddings)

    @property
    def spec(self):
        return self.loaded.spec

    @property
    def graph_spec(self):
        """The inputs of the compiled stages: the spec plus the store's looked-up vectors."""
        return self.stage_spec or self.loaded.spec

    def row_budget(self) -> tuple[int, int]:
        """(parity rows, calibration rows) of the held-out data (sampled rows without data).

        Quantized exports keep up to 2000 rows (a quarter of small files) for calibration at
        the END of the data; parity takes the rest (or ``options.parity_rows`` if set). AUC
        deltas of 1e-4 need many rows to be resolved, so parity defaults to every row it can.
        """
        o = self.options
        calib = 0 if o.precision == "fp32" else CALIBRATION_ROWS
        if o.data is None:
            return (o.parity_rows or 1000), calib
        n_data = len(o.data[self.spec.inputs[0].name])
        if calib:
            calib = min(calib, n_data // 4)
        parity = n_data - calib
        if o.parity_rows is not None:
            parity = min(parity, o.parity_rows)
        return parity, calib



def step_capture(ctx: ExportContext) -> None:
    spec = ctx.spec
    if ctx.loaded.program is not None:  # a .pt2 archive is already captured (exporter.program)
        ctx.program = ctx.loaded.program
    else:
        ctx.program = capture(ctx.loaded.eager(), spec, seed=ctx.options.seed, rows=ctx.options.data)
    ctx.input_names = flat_input_names(spec, to_torch_inputs(spec, sample_rows(spec, 1)))


def step_full_onnx(ctx: ExportContext) -> None:
    ctx.stages["full"] = export_onnx(ctx.program, ctx.input_names, list(ctx.spec.outputs))


def step_split(ctx: ExportContext) -> None:
    """UG split (exporter.steps.split): user.onnx + group.onnx, manifest split/flops; else full only."""
    from exporter.steps.split import split_to_onnx

    rows = ctx.options.data
    if rows is not None and ctx.store_rows is not None:  # cut tables: the stages read looked-up rows
        rows = ctx.store_rows({k: v[:256] for k, v in rows.items()})  # examples: a few rows
    art = split_to_onnx(ctx.program, ctx.graph_spec, seed=ctx.options.seed, rows=rows)
    ctx.manifest_fields["flops"] = Flops.from_dict(art.flops, "split step")
    ctx.extra_files["split_report.json"] = json.dumps(art.manifest_split() or {
        "report": art.report}, indent=2, default=str) + "\n"
    if art.is_split:
        ctx.stages["user"], ctx.stages["group"] = art.user, art.group
        ctx.manifest_fields["split"] = Split.from_dict(art.manifest_split(), "split step")


def step_row_scope(ctx: ExportContext) -> None:
    """manifest.row_scope: does each side keep the rows of a call apart (graph_passes.fx)?"""
    from graph_passes.fx.row_scope import row_scope

    scope = row_scope(ctx.program, split="split" in ctx.manifest_fields)
    ctx.manifest_fields["row_scope"] = RowScope.from_dict(scope, "row-scope step")
    if scope["full"] == "request":
        where = "; ".join(f"{m['op']} ({m['reason']}) at {m['source'] or m['node']}" for m in scope["mixing"][:3])
        console.print(
            f"[yellow]request-scoped:[/] '{ctx.spec.name}' mixes the rows of a call ({where}); "
            "the runtime scores each request in its own group call"
        )


def step_write(ctx: ExportContext) -> None:
    from exporter.steps.graph_record import reconcile

    writer = BundleWriter(ctx.out_dir, overwrite=ctx.options.overwrite,
                          **{k: ctx.options.extra[k] for k in ("external_data_bytes",) if k in ctx.options.extra})
    try:
        paths = {s: writer.add_stage(s, f"{s}.onnx", m) for s, m in ctx.stages.items()}
        # the manifest describes the files as written (layers, boundary, threads), not the plan
        written = {s: onnx.load(str(p), load_external_data=False) for s, p in paths.items()}
        reconcile(ctx.manifest_fields, ctx.stage_meta, written)
        for stage, meta in ctx.stage_meta.items():
            for key, value in meta.items() if stage in writer.stages else ():
                setattr(writer.stages[stage], key, value)
        for rel, content in ctx.extra_files.items():
            writer.add(rel, content)
        fields = {
            "precision": ctx.options.precision,
            "source": Source.from_dict(ctx.loaded.source, "the loaded model"),
            "limits": Limits.default(max_candidates=ctx.options.max_candidates),
            **ctx.manifest_fields,
        }
        writer.finish(model_name=ctx.spec.name, spec=ctx.spec, **fields)
    except BaseException:
        writer.abort()
        raise


def step_parity(ctx: ExportContext) -> None:
    """Eager fp32 vs every stage just written; parity.json + manifest.parity in the bundle."""
    from exporter.steps.parity import check_bundle

    o = ctx.options
    n_parity, _ = ctx.row_budget()
    ctx.parity_report = check_bundle(
        ctx.out_dir,
        ctx.loaded.eager(),
        rows=o.data,
        n_rows=n_parity,
        seed=o.seed,
        budgets=o.extra.get("budgets"),
        program=ctx.captured or ctx.program,
        progress=False,
    )
    console.print(ctx.parity_report.table())


Step = Callable[[ExportContext], None]
PIPELINE: list[tuple[str, Step]] = [
    ("capture", step_capture),
    ("embeddings", step_embeddings),  # tables >= store_min_bytes leave the graphs (the store)
    ("full-onnx", step_full_onnx),
    ("split", step_split),  # after full.onnx: a model that cannot be split still exports
    ("row-scope", step_row_scope),  # after split: the record names the sides it has
    ("optimize", step_optimize),  # every stage, every precision: per-token Einsum -> MatMul
    ("quantize", step_quantize),  # w8a16/w4a16 (exporter.steps.quantize): every stage; fp32: no-op
    ("threads", step_stage_threads),  # ORT CPU: small-batch stages timed on fewer threads
    ("trt-lint", step_trt_lint),  # before write: a graph TensorRT rejects is never written
    ("write", step_write),
    ("trt-build", step_trt_build),  # engines need the written bundle (manifest entry, files)
    ("parity", step_parity),  # last: it measures what was written, engines included
]


def export_bundle(
    loaded: LoadedModel, out_dir: str | Path, options: ExportOptions | None = None
) -> ExportContext:
    """Run every pipeline step on ``loaded`` and write the bundle to ``out_dir``."""
    options = options or ExportOptions()
    if options.precision not in ("fp32", "w8a16", "w4a16"):
        raise ExportError(f"precision '{options.precision}' is not one of fp32, w8a16, w4a16")
    ctx = ExportContext(loaded=loaded, out_dir=Path(out_dir), options=options)
    steps = [(n, s) for n, s in PIPELINE if n != "parity" or options.parity]
    steps = [(n, s) for n, s in steps if n != "split" or options.split]
    target = options.extra.get("target", "onnx")
    steps = [(n, s) for n, s in steps if not n.startswith("trt-") or target == "trt"]
    for i, (name, step) in enumerate(steps, 1):
        t0 = time.perf_counter()
        with console.status(f"[{i}/{len(steps)}] {name} …"):
            step(ctx)
        console.print(f"[{i}/{len(steps)}] {name:<10} done in {time.perf_counter() - t0:5.1f}s")
    return ctx
