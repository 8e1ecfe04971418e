"""The manifest's records of what the export timed and chose: ``optimize`` (per-token layouts,
MoE forms, threads per stage) and ``quantization`` (the quantizer's selection, speed tuning,
weight bytes). Typed like every section (runtime/manifest/sections.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.manifest._fields import (
    ANY,
    BOOL,
    INT,
    INT_NONNEG,
    INT_POS,
    NUM,
    OBJECT,
    STR,
    ListOf,
    MapOf,
    Nullable,
    OneOf,
    Section,
    Sub,
    field_,
)


# -- optimize ------------------------------------------------------------------------------
@dataclass(kw_only=True)
class LayoutChoice(Section):
    """``optimize.per_token_layout.<stage>``: the per-token layout timed for a stage."""

    batch: int = field_(INT, required=True)
    threads: Any = field_(ANY)  # opaque: the timings per thread count
    unrolled_vs_batched: float = field_(NUM, required=True)
    chosen: str = field_(STR, required=True)


@dataclass(kw_only=True)
class MoeBank(Section):
    name: str = field_(STR, required=True)
    tokens: int = field_(INT, required=True)
    experts: int = field_(INT, required=True)
    top_k: int = field_(INT, required=True)
    d_model: int | None = field_(INT, omit_none=True)
    hidden: int | None = field_(INT, omit_none=True)
    params: dict[str, int] = field_(MapOf(INT), required=True)  # total, activated_per_row


@dataclass(kw_only=True)
class MoeForm(Section):
    """``optimize.moe_form.<stage>``: the form of the stage's sparse MoE banks, and why."""

    form: str = field_(STR, required=True)
    chosen_by: str = field_(STR, required=True)  # timed | option | trt
    batch: int | None = field_(INT, omit_none=True)
    threads: Any = field_(ANY, omit_none=True)  # opaque: timings per thread count
    vs_gather: dict[str, float] | None = field_(MapOf(NUM), omit_none=True)
    banks: list[MoeBank] = field_(ListOf(Sub(MoeBank)), factory=list)


@dataclass(kw_only=True)
class Crossover(Section):
    """group_small against group at one candidate count."""

    candidates: int = field_(INT, required=True)
    small_ms: float = field_(NUM, required=True)
    large_ms: float = field_(NUM, required=True)
    ratio: float = field_(NUM, required=True)


@dataclass(kw_only=True)
class ThreadsTimed(Section):
    """``optimize.stage_threads.stages.<stage>``: thread counts timed for a small-batch stage."""

    batch: int = field_(INT, required=True)
    median_ms: dict[str, float] = field_(MapOf(NUM), required=True)
    chosen: str = field_(STR, required=True)
    crossover: list[Crossover] | None = field_(ListOf(Sub(Crossover)), omit_none=True)
    max_rows: int | None = field_(INT_NONNEG, omit_none=True)
    why: str | None = field_(STR, omit_none=True)


@dataclass(kw_only=True)
class StageThreads(Section):
    """``optimize.stage_threads``: what the threads step timed (exporter/steps/threads.py)."""

    cpu: str | None = field_(STR, omit_none=True)
    serve_threads: str = field_(STR, required=True)  # "default" or a count
    stages: dict[str, ThreadsTimed] = field_(MapOf(Sub(ThreadsTimed)), factory=dict)
    why: str | None = field_(STR, omit_none=True)


@dataclass(kw_only=True)
class Optimize(Section):
    """The speed choices the export timed (``optimize``; null when it timed nothing)."""

    NAME = "optimize"
    per_token_layout: dict[str, LayoutChoice] | None = field_(MapOf(Sub(LayoutChoice)), omit_none=True)
    cpu: str | None = field_(STR, omit_none=True)
    serve_threads: int | None = field_(Nullable(INT_POS))  # written with per_token_layout
    moe_form: dict[str, MoeForm] | None = field_(MapOf(Sub(MoeForm)), omit_none=True)
    stage_threads: StageThreads | None = field_(Sub(StageThreads), omit_none=True)

    def omitted(self) -> set[str]:
        # per_token_layout, cpu and serve_threads are one record (the optimize step's)
        return {"serve_threads"} if self.per_token_layout is None and self.cpu is None else set()


# -- quantization --------------------------------------------------------------------------
@dataclass(kw_only=True)
class TunedConfig(Section):
    """One speed configuration timed for a stage."""

    config: str = field_(STR, required=True)  # "fp32" or "min_elements=N,per_token=on|off"
    min_elements: int | None = field_(Nullable(INT))
    per_token: bool | None = field_(Nullable(BOOL))
    layers: int | None = field_(INT, omit_none=True)
    quantized_elements: int | None = field_(INT, omit_none=True)
    median_ms: float = field_(NUM, required=True)
    ratio_vs_fp32: float = field_(NUM, required=True)


@dataclass(kw_only=True)
class TunedStage(Section):
    """``quantization.speed_tuning.stages.<stage>``: configurations timed, the one chosen."""

    batch: int | None = field_(INT, omit_none=True)
    configs: list[TunedConfig] = field_(ListOf(Sub(TunedConfig)), factory=list)
    chosen: str | None = field_(Nullable(STR), omit_none=True)
    min_elements: int | None = field_(Nullable(INT), omit_none=True)  # of the chosen configuration
    per_token: bool | None = field_(Nullable(BOOL), omit_none=True)
    fastest_quantized: str | None = field_(Nullable(STR), omit_none=True)
    why: str | None = field_(STR, omit_none=True)
    crossover: list[Crossover] | None = field_(ListOf(Sub(Crossover)), omit_none=True)
    max_rows: int | None = field_(INT_NONNEG, omit_none=True)


@dataclass(kw_only=True)
class SpeedTuning(Section):
    """``quantization.speed_tuning``: each stage's speed configuration timed on this CPU."""

    cpu: str | None = field_(STR, omit_none=True)
    threads: Any = field_(ANY, omit_none=True)  # a count or "onnxruntime default"
    accuracy_level: int | None = field_(INT, omit_none=True)  # MatMulNBits accuracy_level
    stages: dict[str, TunedStage] = field_(MapOf(Sub(TunedStage)), factory=dict)
    fallback: str | None = field_(STR, omit_none=True)


@dataclass(kw_only=True)
class Verdict(Section):
    """A measured configuration against the budget."""

    passed: bool = field_(BOOL, required=True)
    breaches: Any = field_(ANY, omit_none=True)  # opaque: which limits it missed, by how much
    outputs: dict[str, Any] | None = field_(OBJECT, omit_none=True)  # opaque: metrics per output


@dataclass(kw_only=True)
class AucResolution(Section):
    resolved: bool = field_(BOOL, required=True)
    calibration_rows: int | None = field_(INT, omit_none=True)
    heldout_rows: int | None = field_(Nullable(INT), omit_none=True)
    criterion: str | None = field_(Nullable(STR), omit_none=True)
    verdicts: dict[str, Any] | None = field_(OBJECT, omit_none=True)  # opaque: per output


@dataclass(kw_only=True)
class QuantOutcome(Section):
    """``quantization.outcome.<path>``: everything quantized vs the selection, on one path."""

    all_quantized: Verdict | None = field_(Sub(Verdict), omit_none=True)
    selected: Verdict | None = field_(Sub(Verdict), omit_none=True)
    kept_float: list[str] | None = field_(ListOf(STR), omit_none=True)
    auc_resolution: AucResolution | None = field_(Sub(AucResolution), omit_none=True)


@dataclass(kw_only=True)
class LayerEffect(Section):
    """``quantization.layers[i].effect``: that layer alone quantized, against eager fp32
    (more metrics than these are kept in ``extra``, opaque)."""

    max_abs: float | None = field_(Nullable(NUM), omit_none=True)
    mean_abs: float | None = field_(Nullable(NUM), omit_none=True)
    delta_auc: float | None = field_(Nullable(NUM), omit_none=True)
    top10_overlap_mean: float | None = field_(Nullable(NUM), omit_none=True)
    kendall_tau_mean: float | None = field_(Nullable(NUM), omit_none=True)


@dataclass(kw_only=True)
class QuantLayer(Section):
    """One layer's precision, and why (``quantization.layers[i]``)."""

    name: str = field_(STR, required=True)  # "<stage>:<weight>"
    stage: str = field_(STR, required=True)
    weights: int = field_(INT, required=True)
    precision: str = field_(STR, required=True)  # fp32 | int8 | int4
    kernel: str | None = field_(STR, omit_none=True)
    why: str = field_(STR, required=True)
    effect: LayerEffect | None = field_(Nullable(Sub(LayerEffect)))  # that layer alone quantized


@dataclass(kw_only=True)
class WeightBytes(Section):
    """``quantization.weight_bytes.<stage>``: linear-layer weight bytes before and after."""

    fp32: int = field_(INT_NONNEG, required=True)
    quantized: int = field_(INT_NONNEG, required=True)
    layers: int = field_(INT_NONNEG, required=True)
    quantized_layers: int = field_(INT_NONNEG, required=True)
    quantized_layers_fp32: int = field_(INT_NONNEG, required=True)
    quantized_layers_bytes: int = field_(INT_NONNEG, required=True)


@dataclass(kw_only=True)
class SmallGroupRecord(Section):
    max_rows: int = field_(INT_NONNEG, required=True)


@dataclass(kw_only=True)
class Quantization(Section):
    """What the quantizer did (``quantization``; null for fp32): exporter/steps/quantize.py."""

    NAME = "quantization"
    precision: str = field_(OneOf("w8a16", "w4a16", "w8a8"), required=True)
    scheme: Any = field_(ANY)  # opaque: block size, accuracy level, ...
    passes: list[str] = field_(ListOf(STR), factory=list)
    budget: dict[str, Any] | None = field_(Nullable(OBJECT))  # opaque: the selection's limits
    speed_tuning: SpeedTuning | None = field_(Sub(SpeedTuning), omit_none=True)
    outcome: dict[str, QuantOutcome] | None = field_(MapOf(Sub(QuantOutcome)), omit_none=True)
    group_small: SmallGroupRecord | None = field_(Sub(SmallGroupRecord), omit_none=True)
    layers: list[QuantLayer] = field_(ListOf(Sub(QuantLayer)), factory=list)
    kept_float: list[str] = field_(ListOf(STR), factory=list)
    kept_float_for_speed: list[str] = field_(ListOf(STR), factory=list)
    refusals: list[str] = field_(ListOf(STR), factory=list)
    weight_bytes: dict[str, WeightBytes] = field_(MapOf(Sub(WeightBytes)), required=True)
    quantized_layers: int | None = field_(INT_NONNEG, omit_none=True)
    layers_source: str | None = field_(STR, omit_none=True)
