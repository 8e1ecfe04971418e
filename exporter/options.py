"""What ``ugsep export`` was asked for: the export-wide choices and each step's own options.

Each step module defines its options dataclass with ``add_arguments`` / ``from_args``
(exporter.steps.embeddings.EmbeddingsOptions, optimize.OptimizeOptions,
quantize.QuantizeStepOptions, threads.ThreadsOptions, tensorrt.TensorRTOptions,
write.WriteOptions); ``ExportOptions`` composes them. It lives here rather than in
exporter.pipeline (which re-exports it) so that ``ugsep export --help`` builds its flags
without importing the steps that need torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from exporter.args import StepOptions, arg, positive_int
from exporter.steps.embeddings import EmbeddingsOptions
from exporter.steps.optimize import OptimizeOptions
from exporter.steps.quantize.options import QuantizeStepOptions
from exporter.steps.tensorrt import TensorRTOptions
from exporter.steps.threads import ThreadsOptions
from exporter.steps.write import WriteOptions
from runtime.manifest import DEFAULT_LIMITS

PRECISIONS = ("fp32", "w8a16", "w4a16")
TARGETS = ("onnx", "trt")


@dataclass
class ExportOptions(StepOptions):
    """What the user asked for: the export-wide choices, and each step's own options
    (``StepOptions`` in the step's module; ``ugsep export`` has one flag per option).
    ``target``, ``serve_threads`` and ``budgets`` are read by several steps."""

    precision: str = arg("--precision", default="fp32", choices=list(PRECISIONS),
                         help="fp32, or weight-only int8 / int4 with sensitivity-guided selection")
    split: bool = arg("--no-split", default=True, action="store_false",
                      help="do not split user/group (full.onnx only)")
    parity: bool = arg("--no-parity", default=True, action="store_false",
                       help="skip the parity check (runtime will refuse the bundle)")
    parity_rows: int | None = arg(
        "--parity-rows", type=positive_int, default=None, metavar="N",
        help="parity on the first N held-out rows (default: every --data row but the quantizer's "
        "calibration tail; without --data, 1000 sampled rows)")
    data: dict[str, np.ndarray] | None = None  # held-out rows (+ label, request_id): --data, loaded
    max_candidates: int = arg(
        "--max-candidates", type=positive_int, default=DEFAULT_LIMITS["max_candidates"], metavar="N",
        help=f"the most candidates per call the bundle accepts (default {DEFAULT_LIMITS['max_candidates']})")
    overwrite: bool = arg("--overwrite", default=False, action="store_true",
                          help="replace an existing bundle directory")
    seed: int = arg("--seed", type=int, default=0, help="seed of sampled rows and example inputs")
    target: str = arg("--target", default="onnx", choices=list(TARGETS),
                      help="trt: refuse graphs TensorRT cannot build, and build engines when a GPU "
                      "is present (else later: ugsep build-trt)")
    serve_threads: int | None = arg("--serve-threads", type=positive_int, default=None, metavar="N", help=(
        "ONNX Runtime intra-op threads the bundle will be served with (ugsep serve --threads N): layout and w8a16 speed choices are timed with N threads "
        "(default: 1 and ORT's default for the layout, ORT's default for w8a16), and the user and group_small graphs at batch 1 on N and fewer threads (the faster count is the stage's cap at serving time)"))
    budgets: str | Path | dict[str, Any] | None = arg("--budgets", default=None, metavar="FILE",
                                                      help="parity budgets (JSON/YAML file)")
    embeddings: EmbeddingsOptions = field(default_factory=EmbeddingsOptions)
    optimize: OptimizeOptions = field(default_factory=OptimizeOptions)
    quantize: QuantizeStepOptions = field(default_factory=QuantizeStepOptions)
    threads: ThreadsOptions = field(default_factory=ThreadsOptions)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    write: WriteOptions = field(default_factory=WriteOptions)

    STEP_OPTIONS: ClassVar[dict[str, type[StepOptions]]] = {
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
        super().add_arguments(p)
        for name, options in cls.STEP_OPTIONS.items():
            options.add_arguments(p.add_argument_group(f"step {name}"))

    @classmethod
    def from_args(cls, args: argparse.Namespace, data: dict[str, np.ndarray] | None = None) -> ExportOptions:
        """The options ``ugsep export`` parsed (``data``: the rows --data named, loaded)."""
        steps = {name: options.from_args(args) for name, options in cls.STEP_OPTIONS.items()}
        return super().from_args(args, data=data, **steps)
