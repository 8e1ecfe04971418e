"""The manifest's sections, one typed dataclass each (docs/bundle-format.md lists every
field, its type, meaning, writer and readers). What the export timed and chose (``optimize``,
``quantization``) is in runtime/manifest/tuning.py.

Every key the runtime or ``ugsep inspect`` reads is a typed field. Fields typed ``OBJECT``
or ``ANY`` are reports for people (the split report, per-output parity metrics, a layer's
measured effect, the quantization budget, ...): checked to be JSON objects, read whole.
Keys a section does not declare are kept verbatim in ``extra`` (so a bundle round-trips)
and never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.manifest._fields import (
    ANY,
    BOOL,
    INT,
    INT_NONNEG,
    INT_POS,
    OBJECT,
    STR,
    At,
    ListOf,
    MapOf,
    Nullable,
    OneOf,
    Scalar,
    Section,
    Sub,
    field_,
)

STAGES = ("full", "user", "group", "group_small")
SIDES = ("full", "user", "group")
ROW_SCOPES = ("rows", "request")
DIM = Scalar((int, str), "an int or a dim name")
DEFAULT_LIMITS = {"max_candidates": 4096, "max_users_per_call": 256}
MAX_ROWS_WHAT = "needs 'max_rows', an int >= 1 (the largest candidate count group_small serves)"


# -- stages --------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Stage(Section):
    """One compiled graph (``stages.<name>``)."""

    file: str = field_(STR, required=True)  # bundle-relative ONNX file
    inputs: list[str] | None = field_(ListOf(STR), omit_none=True)  # the graph's inputs, in order
    outputs: list[str] | None = field_(ListOf(STR), omit_none=True)
    max_rows: int | None = field_(Scalar((int,), MAX_ROWS_WHAT, minimum=1), omit_none=True)  # group_small
    intra_op_threads: int | None = field_(INT_POS, omit_none=True)  # CPU: at most this many threads


# -- split, flops ------------------------------------------------------------------------
@dataclass(kw_only=True)
class BoundaryTensor(Section):
    """One tensor the user graph hands the group graph (one row per user)."""

    name: str = field_(STR, required=True)
    dtype: str = field_(STR, required=True)
    shape: list[int | str] = field_(ListOf(DIM), required=True)
    source: str | None = field_(Nullable(STR))  # the module that produced it (for people)


@dataclass(kw_only=True)
class SplitReport(Section):
    """``split.report``: the split pass's report for people (blocked / moved nodes, hoisted
    modules, FLOPs, ceilings: kept in ``extra``, opaque); ``reason`` says why nothing split."""

    reason: str | None = field_(Nullable(STR), omit_none=True)


@dataclass(kw_only=True)
class Split(Section):
    """The user/group split (``split``; null when the bundle is not split)."""

    NAME = "split"
    boundary: list[BoundaryTensor] = field_(ListOf(Sub(BoundaryTensor)), required=True)
    user_index: str | None = field_(STR, omit_none=True)  # the group input mapping candidates to users
    report: SplitReport = field_(Sub(SplitReport), factory=SplitReport)  # for people


@dataclass(kw_only=True)
class Flops(Section):
    """FLOPs per row of each side (``flops``; ``{}`` when not split)."""

    NAME = "flops"
    full_per_row: int | None = field_(Nullable(INT), omit_none=True)
    user_per_row: int | None = field_(Nullable(INT), omit_none=True)
    group_per_row: int | None = field_(Nullable(INT), omit_none=True)


# -- files, source, limits -----------------------------------------------------------------
@dataclass(kw_only=True)
class FileEntry(Section):
    """``files.<relative path>``: what the file must hash to."""

    sha256: str = field_(STR, required=True)
    bytes: int | None = field_(INT_NONNEG, omit_none=True)


@dataclass(kw_only=True)
class Source(Section):
    """Where the model came from (``source``; ``{}`` when the writer did not say)."""

    NAME = "source"
    checkpoint: str | None = field_(Nullable(STR), omit_none=True)
    checkpoint_sha256: str | None = field_(Nullable(STR), omit_none=True)
    factory: str | None = field_(Nullable(STR), omit_none=True)
    kwargs: dict[str, Any] | None = field_(Nullable(OBJECT), omit_none=True)


@dataclass(kw_only=True)
class Limits(Section):
    """What one call may hold (``limits``)."""

    NAME = "limits"
    max_candidates: int = field_(INT_POS, required=True)
    max_users_per_call: int = field_(INT_POS, required=True)

    @classmethod
    def default(cls, **over: int) -> Limits:
        return cls(**{**DEFAULT_LIMITS, **over})


# -- parity --------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Parity(Section):
    """The parity verdict (``parity``; null before ``ugsep check``). The runtime refuses to
    serve a bundle whose ``passed`` is false, naming ``failed_stages``."""

    NAME = "parity"
    passed: bool = field_(BOOL, required=True)
    failed_stages: list[str] = field_(ListOf(STR), factory=list)
    summary: dict[str, Any] = field_(OBJECT, factory=dict)  # opaque: per configuration, for people
    report: str | None = field_(Nullable(STR), omit_none=True)  # the full report's file


# -- row scope -----------------------------------------------------------------------------
@dataclass(kw_only=True)
class RowMixing(Section):
    """One op that mixes the rows of a call."""

    op: str = field_(STR, required=True)
    node: str = field_(STR, required=True)
    reason: str = field_(STR, required=True)
    source: str | None = field_(Nullable(STR))


@dataclass(kw_only=True)
class RowScope(Section):
    """Per side, proven at export: "rows" (rows stay apart) or "request" (rows mix)."""

    NAME = "row_scope"
    full: str = field_(OneOf(*ROW_SCOPES), required=True)
    user: str | None = field_(OneOf(*ROW_SCOPES), omit_none=True)
    group: str | None = field_(OneOf(*ROW_SCOPES), omit_none=True)
    mixing: list[RowMixing] = field_(ListOf(Sub(RowMixing)), factory=list)

    def side(self, side: str) -> str:
        return getattr(self, side, None) or self.full


# -- embeddings ----------------------------------------------------------------------------
@dataclass(kw_only=True)
class StoreTable(Section):
    """One table in the embedding store."""

    name: str = field_(STR, required=True)
    rows: int = field_(INT_NONNEG, required=True)
    dim: int = field_(INT_POS, required=True)
    dtype: str = field_(OneOf("float32", "float16", "int8_rowwise"), required=True)
    source_dtype: str | None = field_(Nullable(STR), omit_none=True)
    file: str | None = field_(Nullable(STR), omit_none=True)
    tensors: dict[str, str] = field_(MapOf(STR, ("weight", "qweight", "scale_bias")), required=True)
    sha256: str | None = field_(Nullable(STR))
    bytes: int | None = field_(Nullable(INT_NONNEG))


@dataclass(kw_only=True)
class StoreLookup(Section):
    """One lookup the runtime does before a stage: ``table`` rows by ``input`` ids."""

    stage_input: str = field_(STR, required=True)  # the stage graph input it feeds
    table: str = field_(STR, required=True)
    input: str = field_(STR, required=True)  # the spec's id input
    side: str = field_(OneOf("user", "group"), required=True)
    op: str = field_(STR, required=True)
    offsets: list[int] | None = field_(Nullable(ListOf(INT)))  # per id column, into the table
    shape: list[int] = field_(ListOf(INT))
    node: str | None = field_(Nullable(STR))
    module: str | None = field_(Nullable(STR))


@dataclass(kw_only=True)
class InGraphTable(Section):
    """A table that stays in the graphs, and why."""

    name: str = field_(STR, required=True)
    rows: int = field_(INT_NONNEG, required=True)
    dim: int = field_(INT_NONNEG, required=True)
    bytes: int = field_(INT_NONNEG, required=True)
    reason: str = field_(STR, required=True)


@dataclass(kw_only=True)
class Embeddings(Section):
    """Tables outside the graphs, in a memory-mapped safetensors file (``embeddings``; absent
    when none leaves): runtime/embstore.py, docs/embedding-store.md."""

    NAME = "embeddings"
    format: str | None = field_(OneOf("safetensors"), omit_none=True)
    file: str = field_(STR, required=True)
    dtype: str = field_(OneOf("fp32", "fp16", "int8"), required=True)
    min_table_bytes: int | None = field_(INT_NONNEG, omit_none=True)
    tables: list[StoreTable] = field_(ListOf(Sub(StoreTable)), required=True)
    lookups: list[StoreLookup] = field_(ListOf(Sub(StoreLookup)), required=True)
    in_graph: list[InGraphTable] = field_(ListOf(Sub(InGraphTable)), required=True)

    def validate(self, at: At) -> None:
        names = {t.name for t in self.tables}
        for i, lk in enumerate(self.lookups):
            if lk.table not in names:
                raise (at / "lookups" / i / "table").error(
                    f"names table {lk.table!r}, which is not in embeddings.tables")

    def table(self, name: str) -> StoreTable:
        return next(t for t in self.tables if t.name == name)


# -- engines -------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Engine(Section):
    """TensorRT engines built for one GPU model and TensorRT version (``engines[i]``)."""

    dir: str = field_(STR, required=True)  # engines/<gpu-slug>-trt<version>
    gpu: str | None = field_(STR, omit_none=True)  # the GPU model that built them
    compute_capability: str | None = field_(STR, omit_none=True)  # "8.6"
    trt_version: str | None = field_(STR, omit_none=True)  # a plan runs only on this version
    stages: list[str] = field_(ListOf(STR), omit_none=True, factory=list)
    files: Any = field_(ANY, omit_none=True)  # the plan files (a list; opaque)
    precision: str | None = field_(STR, omit_none=True)
    profiles: dict[str, Any] | None = field_(OBJECT, omit_none=True)  # opaque: M/N ranges
    built: str | None = field_(STR, omit_none=True)
    store_inputs: dict[str, list[str]] | None = field_(MapOf(ListOf(STR)), omit_none=True)  # per stage: engine inputs that are looked-up store rows
