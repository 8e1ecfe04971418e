"""Quantize step, job 1: what to quantize and how (``QuantizeOptions``), per target.

The targets: ``ort-cpu`` (com.microsoft.MatMulNBits), ``gpu`` (DequantizeLinear with fp16
scales, for TensorRT) and ``qdq``; their default speed choices (``TARGET_DEFAULTS``) and
the passes each runs (``PASSES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporter.args import StepOptions, arg, as_tuple, positive_int
from exporter.errors import ExportError
from exporter.evaluate.budgets import DEFAULTS
from graph_passes.onnx.pipelines import NBITS_MIN_ELEMENTS

PRECISIONS = {"w8a16": 8, "w4a16": 4}
TARGETS = ("ort-cpu", "gpu", "qdq")
_ALL_STAGES = ("full", "user", "group")
TARGET_DEFAULTS: dict[str, dict[str, Any]] = {
    "ort-cpu": {"min_elements": NBITS_MIN_ELEMENTS, "per_token_stages": ("user",)},
    "gpu": {"min_elements": 0, "per_token_stages": _ALL_STAGES},
    "qdq": {"min_elements": 0, "per_token_stages": _ALL_STAGES},
}


@dataclass
class QuantizeOptions:
    """How to quantize. ``block_size`` None = int8 per output channel (w4a16 defaults to 32);
    ``accuracy_level`` is MatMulNBits' (ORT CPU only; 4 = int8 activations inside the kernel,
    the fast path); ``budget`` overrides the parity budget of the precision; ``stages``
    limits quantization to some stages (e.g. ``("user", "full")``: on ORT CPU the weight-only
    kernel pays at the user side's batch 1 but loses to fp32 GEMM at a group batch of 512,
    see benchmarks/bench_quant_accuracy_level.py); stages left out keep fp32 weights.
    ``min_elements``: weights (per-token: per token) smaller than this stay fp32 for speed
    (not unrolled, not quantized). ``per_token_stages``: stages whose per-token weights
    ``W[T, D, H]`` are unrolled and quantized; elsewhere they stay one fp32 batched MatMul.

    ``tune`` (default: on for ort-cpu unless either knob is given): choose both per stage by
    timing each stage graph on this CPU (``tune_for_speed``, exporter/steps/quantize/speed.py): what
    pays depends on the CPU (a per-token [128, 512] weight at batch 1 ran 0.55x fp32 on one
    x86-64 machine and 0.94x on a Zen 3 without VNNI). ``tune_threads``: intra-op threads
    timed (None: ONNX Runtime's default, as the runtime uses). With ``tune`` off the knobs
    default by target (``TARGET_DEFAULTS``): on ort-cpu ``NBITS_MIN_ELEMENTS`` and per-token
    weights only on the user side (measured on the first machine; benchmarks/bench_quant.py);
    on gpu / qdq every layer is a candidate (TensorRT fuses DequantizeLinear into the GEMM).
    ``min_elements=0`` and all three ``per_token_stages`` quantize every eligible layer:
    smallest bundle, slower on ORT CPU. When fixed knobs leave nothing to quantize (a tiny
    model), export stops and says so.

    ``small_batch`` (tuning only): None = the group stage is also tuned at batch 1 and, when
    a different configuration wins there, the bundle gets a ``group_small`` stage serving
    group calls up to the measured crossover (``timing.crossover``); 0 = never; K > 0 =
    always, serving calls of up to K candidates with the configuration fastest at batch 1.
    The tuner sets ``group_small_rows`` (0: no such stage)."""

    precision: str = "w8a16"
    target: str = "ort-cpu"
    block_size: int | None = None
    accuracy_level: int = 4
    budget: dict[str, float] | None = None
    select: bool = True
    stages: tuple[str, ...] = ("full", "user", "group")
    min_elements: int | None = None
    per_token_stages: tuple[str, ...] | None = None
    tune: bool | None = None
    tune_threads: int | None = None
    stage_min_elements: dict[str, int] | None = None  # per stage, set by speed tuning
    small_batch: int | None = None
    group_small_rows: int = 0  # set by speed tuning: group_small serves calls up to this N

    def __post_init__(self) -> None:
        if self.tune is None:  # explicit speed knobs are the user's choice: no tuning
            explicit = self.min_elements is not None or self.per_token_stages is not None
            self.tune = self.target == "ort-cpu" and not explicit
        if self.target in TARGET_DEFAULTS:
            defaults = TARGET_DEFAULTS[self.target]
            if self.min_elements is None:
                self.min_elements = defaults["min_elements"]
            if self.per_token_stages is None:
                self.per_token_stages = defaults["per_token_stages"]
        if self.precision not in PRECISIONS:
            raise ExportError(
                f"precision '{self.precision}' is not quantized; use one of {list(PRECISIONS)}"
            )
        if self.target not in TARGETS:
            raise ExportError(f"quantization target '{self.target}' is not one of {list(TARGETS)}")
        if self.precision == "w4a16" and self.block_size is None:
            self.block_size = 32
        if self.small_batch is not None and (
            isinstance(self.small_batch, bool) or int(self.small_batch) < 0
        ):
            raise ExportError(
                f"small_batch must be None (timed), 0 (off) or a candidate count > 0, "
                f"got {self.small_batch!r}"
            )

    @property
    def bits(self) -> int:
        return PRECISIONS[self.precision]

    def min_elements_for(self, stage: str) -> int:
        if self.stage_min_elements and stage in self.stage_min_elements:
            return self.stage_min_elements[stage]
        return int(self.min_elements or 0)

    def limits(self) -> dict[str, float]:
        return {**DEFAULTS[self.precision], **(self.budget or {})}

    def scheme(self) -> dict[str, Any]:
        lowering = {
            "ort-cpu": f"com.microsoft.MatMulNBits(bits={self.bits}, accuracy_level={self.accuracy_level})",
            "gpu": "DequantizeLinear(fp16 scale) -> MatMul on fp16 activations",
            "qdq": "DequantizeLinear -> MatMul",
        }[self.target]
        grain = (
            "per-output-channel" if self.block_size is None else f"block-{self.block_size} along K"
        )
        return {
            "stages": list(self.stages),
            "bits": self.bits,
            "symmetric": True,
            "granularity": grain,
            "target": self.target,
            "lowering": lowering,
            "min_elements": dict(self.stage_min_elements)
            if self.stage_min_elements
            else self.min_elements,
            "per_token_stages": list(self.per_token_stages),
        }


PASSES = {
    "ort-cpu": ["canonicalize_linear", "QuantizeWeightsInt8Pass", "LowerToMatMulNBitsPass"],
    "gpu": ["canonicalize_linear", "QuantizeWeightsInt8Pass", "Fp16ActivationsPass"],
    "qdq": ["canonicalize_linear", "QuantizeWeightsInt8Pass"],
}


def _small_batch(value: str) -> int | None:
    """--quant-small-batch: auto -> None (timed), off -> 0, N -> N (> 0)."""
    if value == "auto":
        return None
    if value == "off":
        return 0
    return positive_int(value, "auto, off or a candidate count > 0")


@dataclass
class QuantizeStepOptions(StepOptions):
    """Step ``quantize``: the user's knobs (the --quant-* flags); ``resolve`` makes the
    ``QuantizeOptions`` of an export from them, the precision, the target and the budget.
    None = chosen for the target (timed on this CPU for ort-cpu unless ``tune`` is off or
    either speed knob is given; see QuantizeOptions)."""

    min_elements: int | None = arg(
        "--quant-min-elements", type=int, default=None, metavar="N",
        help="w8a16/w4a16: keep weights with fewer than N elements in float (default: ort-cpu "
        "timed per stage on this CPU, else 16384; gpu/qdq 0; 0 quantizes every layer)")
    per_token_stages: tuple[str, ...] | None = arg(
        "--quant-per-token-stages", nargs="*", default=None, metavar="STAGE", choices=list(_ALL_STAGES),
        convert=as_tuple,
        help="w8a16/w4a16: stages whose per-token FFN weights are quantized (default: ort-cpu timed "
        "per stage on this CPU, else user; gpu/qdq all three; none: give the flag no values)")
    tune: bool = arg(
        "--no-quant-tune", default=True, action="store_false",
        help="w8a16/w4a16 on ORT CPU: use the fixed speed defaults (16384, user) instead of timing "
        "each stage on this CPU (tuning is off anyway when either knob above is given)")
    small_batch: int | None = arg(
        "--quant-small-batch", type=_small_batch, default=None, metavar="auto|off|N",
        help="w8a16/w4a16 on ORT CPU with tuning: a second group graph (group_small) tuned at 1 "
        "candidate, run for calls up to the measured crossover (auto, the default; built only when "
        "it wins), never (off), or always for calls of up to N candidates")
    block_size: int | None = arg(
        "--quant-block-size", type=positive_int, default=None, metavar="K",
        help="w8a16/w4a16: quantize in blocks of K along the reduction dim (default: w8a16 one "
        "scale per output channel, w4a16 32)")
    accuracy_level: int = arg(
        "--quant-accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
        help="ort-cpu: MatMulNBits' accuracy_level (default 4: int8 activations inside the "
        "kernel, the fast path)")
    stages: tuple[str, ...] = arg(
        "--quant-stages", nargs="+", default=_ALL_STAGES, metavar="STAGE", choices=list(_ALL_STAGES),
        convert=as_tuple, help="w8a16/w4a16: stages to quantize (default all; the others keep fp32 weights)")

    def resolve(
        self, precision: str, *, target: str = "onnx", budget: dict[str, float] | None = None,
        threads: int | None = None,
    ) -> QuantizeOptions:
        """The ``QuantizeOptions`` of an export (``target`` "trt" quantizes for the GPU)."""
        return QuantizeOptions(
            precision=precision,
            target="gpu" if target == "trt" else "ort-cpu",
            block_size=self.block_size,
            accuracy_level=int(self.accuracy_level),
            budget=budget,
            stages=tuple(self.stages or _ALL_STAGES),
            min_elements=self.min_elements,
            per_token_stages=None if self.per_token_stages is None else tuple(self.per_token_stages),
            tune=None if self.tune else False,
            small_batch=self.small_batch,
            tune_threads=threads,
        )
