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

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from exporter.args import positive_int
from exporter.errors import ExportError
from exporter.load import LoadedModel
from exporter.progress import console
from exporter.steps.capture import step_capture, step_full_onnx
from exporter.steps.embeddings import EmbeddingsOptions, step_embeddings
from exporter.steps.optimize import OptimizeOptions, step_optimize
from exporter.steps.parity import step_parity
from exporter.steps.quantize import CALIBRATION_ROWS, QuantizeStepOptions, step_quantize
from exporter.steps.split import step_row_scope, step_split
from exporter.steps.tensorrt import TensorRTOptions, step_trt_build, step_trt_lint
from exporter.steps.threads import ThreadsOptions, step_stage_threads
from exporter.steps.write import WriteOptions, step_write
from runtime.manifest import DEFAULT_LIMITS

log = logging.getLogger(__name__)


PRECISIONS = ("fp32", "w8a16", "w4a16")
TARGETS = ("onnx", "trt")


@dataclass
class ExportOptions:
    """What the user asked for: the export-wide choices, and each step's own options
    (``add_arguments`` / ``from_args`` in the step's module; ``ugsep export`` has one flag
    per field). ``target``, ``serve_threads`` and ``budgets`` are read by several steps."""

    precision: str = "fp32"
    split: bool = True
    parity: bool = True
    parity_rows: int | None = None  # None: all data rows but the calibration tail; 1000 sampled
    data: dict[str, np.ndarray] | None = None  # held-out rows (+ label, request_id)
    max_candidates: int = DEFAULT_LIMITS["max_candidates"]
    overwrite: bool = False
    seed: int = 0
    target: str = "onnx"  # trt: graphs TensorRT accepts, engines built when a GPU is present
    serve_threads: int | None = None  # intra-op threads the bundle is served with (timing)
    budgets: str | Path | dict[str, Any] | None = None  # parity budgets (file or mapping)
    embeddings: EmbeddingsOptions = field(default_factory=EmbeddingsOptions)
    optimize: OptimizeOptions = field(default_factory=OptimizeOptions)
    quantize: QuantizeStepOptions = field(default_factory=QuantizeStepOptions)
    threads: ThreadsOptions = field(default_factory=ThreadsOptions)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    write: WriteOptions = field(default_factory=WriteOptions)

    STEP_OPTIONS: ClassVar[dict[str, type]] = {
        "embeddings": EmbeddingsOptions,
        "optimize": OptimizeOptions,
        "quantize": QuantizeStepOptions,
        "threads": ThreadsOptions,
        "tensorrt": TensorRTOptions,
        "write": WriteOptions,
    }

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        """The export-wide flags, then each step's (in pipeline order)."""
        p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                       help="fp32, or weight-only int8 / int4 with sensitivity-guided selection")
        p.add_argument("--target", default="onnx", choices=list(TARGETS),
                       help="trt: refuse graphs TensorRT cannot build, and build engines when a GPU "
                       "is present (else later: ugsep build-trt)")
        p.add_argument("--no-split", action="store_true", help="do not split user/group (full.onnx only)")
        p.add_argument("--no-parity", action="store_true",
                       help="skip the parity check (runtime will refuse the bundle)")
        p.add_argument("--parity-rows", type=positive_int, default=None, metavar="N",
                       help="parity on the first N held-out rows (default: every --data row but the "
                       "quantizer's calibration tail; without --data, 1000 sampled rows)")
        p.add_argument("--budgets", help="parity budgets (JSON/YAML file)")
        p.add_argument("--serve-threads", type=positive_int, default=None, metavar="N",
                       help="ONNX Runtime intra-op threads the bundle will be served with (ugsep serve "
                       "--threads N): layout and w8a16 speed choices are timed with N threads (default: "
                       "1 and ORT's default for the layout, ORT's default for w8a16), and the user and "
                       "group_small graphs at batch 1 on N and fewer threads (the faster count is the "
                       "stage's cap at serving time)")
        p.add_argument("--max-candidates", type=positive_int, default=DEFAULT_LIMITS["max_candidates"],
                       metavar="N", help="the most candidates per call the bundle accepts "
                       f"(manifest limits; default {DEFAULT_LIMITS['max_candidates']})")
        p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
        p.add_argument("--seed", type=int, default=0, help="seed of sampled rows and example inputs")
        for options in cls.STEP_OPTIONS.values():
            options.add_arguments(p)

    @classmethod
    def from_args(cls, args: argparse.Namespace, data: dict[str, np.ndarray] | None = None) -> ExportOptions:
        """The options ``ugsep export`` parsed (``data``: the rows --data named, loaded)."""
        return cls(
            precision=args.precision,
            split=not args.no_split,
            parity=not args.no_parity,
            parity_rows=args.parity_rows,
            data=data,
            max_candidates=args.max_candidates,
            overwrite=args.overwrite,
            seed=args.seed,
            target=args.target,
            serve_threads=args.serve_threads,
            budgets=args.budgets,
            **{name: options.from_args(args) for name, options in cls.STEP_OPTIONS.items()},
        )


@dataclass
class ExportContext:
    """State threaded through the steps; each step reads what earlier ones left."""

    loaded: LoadedModel
    out_dir: Path
    options: ExportOptions
    program: Any = None
    input_names: list[str] = field(default_factory=list)
    stages: dict[str, onnx.ModelProto] = field(default_factory=dict)
    stage_meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra manifest keys
    manifest_fields: dict[str, Any] = field(default_factory=dict)
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
        raise ExportError(f"precision '{options.precision}' is not one of fp32, w8a16, w4a16")
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
