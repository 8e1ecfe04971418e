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

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from exporter.errors import ExportError
from exporter.load import LoadedModel
from exporter.options import PRECISIONS, TARGETS, ExportOptions
from exporter.progress import console
from exporter.steps.capture import step_capture, step_full_onnx
from exporter.steps.embeddings import step_embeddings
from exporter.steps.optimize import step_optimize
from exporter.steps.parity import step_parity
from exporter.steps.quantize import CALIBRATION_ROWS, step_quantize
from exporter.steps.split import step_row_scope, step_split
from exporter.steps.tensorrt import step_trt_build, step_trt_lint
from exporter.steps.threads import step_stage_threads
from exporter.steps.write import step_write

if TYPE_CHECKING:
    from torch.export import ExportedProgram

    from exporter.steps.parity import ParityReport
    from runtime.spec import FeatureSpec

Rows = dict[str, np.ndarray]
log = logging.getLogger(__name__)


@dataclass
class ExportContext:
    """State threaded through the steps; each step reads what earlier ones left."""

    loaded: LoadedModel
    out_dir: Path
    options: ExportOptions
    program: ExportedProgram | Any = None  # torch.export's program (after the embedding cut)
    input_names: list[str] = field(default_factory=list)
    stages: dict[str, onnx.ModelProto] = field(default_factory=dict)
    stage_meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra manifest keys
    manifest_fields: dict[str, Any] = field(default_factory=dict)  # Manifest field -> typed section
    extra_files: dict[str, Any] = field(default_factory=dict)
    parity_report: ParityReport | None = None
    stage_spec: FeatureSpec | None = None  # the compiled stages' inputs when the embedding step cut tables
    captured: ExportedProgram | Any = None  # the program as captured (before the embedding cut)
    store_rows: Callable[[Rows], Rows] | None = None  # rows -> rows + the store's looked-up vectors

    @property
    def spec(self) -> FeatureSpec:
        return self.loaded.spec

    @property
    def graph_spec(self) -> FeatureSpec:
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
    if options.precision not in PRECISIONS:
        raise ExportError(f"precision '{options.precision}' is not one of {', '.join(PRECISIONS)}")
    if options.target not in TARGETS:
        raise ExportError(f"target '{options.target}' is not one of {', '.join(TARGETS)}")
    ctx = ExportContext(loaded=loaded, out_dir=Path(out_dir), options=options)
    steps = [(n, s) for n, s in PIPELINE if n != "parity" or options.parity]
    steps = [(n, s) for n, s in steps if n != "split" or options.split]
    steps = [(n, s) for n, s in steps if not n.startswith("trt-") or options.target == "trt"]
    for i, (name, step) in enumerate(steps, 1):
        t0 = time.perf_counter()
        with console.status(f"[{i}/{len(steps)}] {name} …"):
            step(ctx)
        console.print(f"[{i}/{len(steps)}] {name:<10} done in {time.perf_counter() - t0:5.1f}s")
    return ctx
