"""The bundle manifest: the contract between the exporter (writes) and the runtime (reads).

``manifest.json`` sits at the root of a bundle. Every section is a typed dataclass
(runtime/manifest/sections.py, tuning.py; docs/bundle-format.md lists every field, its type, its
meaning, who writes it and who reads it). ``Manifest.from_dict`` checks every field and
refuses a manifest with a ``BundleError`` naming the file and the field path::

    .../manifest.json: stages.group.intra_op_threads: expected an int >= 1, got 'x'

and ``to_dict`` writes back exactly what was read (a signature covers the bytes).

    format             "ugsep-bundle"
    format_version     int (FORMAT_VERSION)
    model_name, toolchain_version, created (ISO-8601 UTC)
    spec               FeatureSpec.to_dict()
    precision          "fp32" | "fp16" | "w8a16" | "w4a16"
    stages             {stage: Stage}: "full" always; "user" and "group" when split;
                       "group_small" (split only, with max_rows) for calls of few candidates
    split              Split | null          flops     Flops ({} when not split)
    files              {path: FileEntry}     parity    Parity | null
    source             Source                limits    Limits
    quantization       Quantization | null   engines   [Engine]
    optimize           Optimize | null       row_scope RowScope | null (null: "rows")
    embeddings         Embeddings (absent when every table is in the graphs)

Format versions and migration
-----------------------------
``format_version`` changes only when the on-disk format does (a key renamed, retyped or
given a new meaning; a new optional key does not need a new version). A reader of version
``FORMAT_VERSION`` reads an older manifest by running the registered chain
``MIGRATIONS[v]`` (a function from the version-``v`` JSON to the version ``v + 1`` JSON)
from its version up to ``FORMAT_VERSION``, before any field is checked; a version with no
chain to ``FORMAT_VERSION`` (older without a registered step, or newer than this runtime)
is refused with a ``BundleError`` naming the version found and the versions supported.
A migrated manifest is held in memory in the current format; the bundle on disk is not
rewritten (its files and signature stay valid). Version 1 is the first: nothing to migrate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import BundleError
from runtime.manifest._fields import At, Kind, ListOf, MapOf, Nullable, Section, Sub
from runtime.manifest.sections import (
    DEFAULT_LIMITS,
    MAX_ROWS_WHAT,
    ROW_SCOPES,
    STAGES,
    BoundaryTensor,
    Embeddings,
    Engine,
    FileEntry,
    Flops,
    Limits,
    Parity,
    RowScope,
    Source,
    Split,
    Stage,
)
from runtime.manifest.tuning import Optimize, Quantization
from runtime.spec import FeatureSpec

__all__ = [
    "DEFAULT_LIMITS", "FORMAT", "FORMAT_VERSION", "MANIFEST_NAME", "MIGRATIONS", "PRECISIONS",
    "ROW_SCOPES", "SMALL_GROUP", "STAGES", "BoundaryTensor", "Embeddings", "Engine",
    "FileEntry", "Flops", "Limits", "Manifest", "Optimize", "Parity",
    "Quantization", "RowScope", "Source", "Split", "Stage", "supported_versions",
]

FORMAT = "ugsep-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "w8a16", "w4a16", "w8a8")
SMALL_GROUP = "group_small"

# version v -> the function turning a version-v manifest (JSON) into version v + 1
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def supported_versions() -> list[int]:
    """The format versions this runtime reads: FORMAT_VERSION and every version with a
    registered migration chain up to it."""
    out, v = [FORMAT_VERSION], FORMAT_VERSION - 1
    while v in MIGRATIONS:
        out.insert(0, v)
        v -= 1
    return out


def migrate(d: dict[str, Any], where: str) -> dict[str, Any]:
    """``d`` brought to FORMAT_VERSION by the registered chain, or refused naming versions."""
    version = d.get("format_version")
    supported = supported_versions()
    if isinstance(version, bool) or not isinstance(version, int) or version not in supported:
        raise BundleError(
            f"{where}: format_version {version!r} is not supported by this runtime (it reads "
            f"version{'s' if len(supported) > 1 else ''} {', '.join(map(str, supported))}); "
            "re-export the bundle with this ugsep"
        )
    while version < FORMAT_VERSION:
        d = MIGRATIONS[version](dict(d))
        version += 1
        d["format_version"] = version
    return d


@dataclass
class Manifest:
    """In-memory form of ``manifest.json``; ``to_dict``/``from_dict`` round-trip exactly."""

    model_name: str
    spec: FeatureSpec
    stages: dict[str, Stage]
    files: dict[str, FileEntry]
    toolchain_version: str
    created: str
    precision: str = "fp32"
    split: Split | None = None
    flops: Flops = field(default_factory=Flops)
    parity: Parity | None = None
    source: Source = field(default_factory=Source)
    limits: Limits = field(default_factory=Limits.default)
    quantization: Quantization | None = None
    engines: list[Engine] = field(default_factory=list)
    optimize: Optimize | None = None  # what the export's optimize step chose, and why
    row_scope: RowScope | None = None  # proven per side: "rows" or "request"
    embeddings: Embeddings | None = None  # the embedding store (runtime/embstore.py)
    format_version: int = FORMAT_VERSION

    @property
    def is_split(self) -> bool:
        return self.split is not None and "user" in self.stages and "group" in self.stages

    @property
    def small_group_rows(self) -> int:
        """Calls of at most this many candidates run ``group_small`` (0: no such stage)."""
        st = self.stages.get(SMALL_GROUP)
        return int(st.max_rows or 0) if st and self.is_split else 0

    @property
    def request_scoped(self) -> bool:
        """True when the served graph mixes the rows of a call: one request per group call."""
        return self.mixes_rows("group" if self.is_split else "full")

    def mixes_rows(self, side: str) -> bool:
        """Whether ``side`` ("full", "user", "group") was proven to mix rows ("request")."""
        return self.row_scope is not None and self.row_scope.side(side) == "request"

    def stage_threads(self, stage: str) -> int | None:
        """The most intra-op threads worth using for ``stage`` on a CPU (None: no cap)."""
        st = self.stages.get(stage)
        return st.intra_op_threads if st else None

    @property
    def store_dtype(self) -> str:
        """The embedding store's dtype ("fp32" when there is no store)."""
        return self.embeddings.dtype if self.embeddings else "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "model_name": self.model_name,
            "toolchain_version": self.toolchain_version,
            "created": self.created,
            "spec": self.spec.to_dict(),
            "precision": self.precision,
            "stages": _dump(self.stages),
            "split": _dump(self.split),
            "flops": _dump(self.flops),
            "files": _dump(self.files),
            "parity": _dump(self.parity),
            "source": _dump(self.source),
            "limits": _dump(self.limits),
            "quantization": _dump(self.quantization),
            "engines": _dump(self.engines),
            "optimize": _dump(self.optimize),
            "row_scope": _dump(self.row_scope),
            **({"embeddings": _dump(self.embeddings)} if self.embeddings else {}),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def checked(self, where: str) -> Manifest:
        """This manifest read back from its JSON: every field checked (and sections given as
        JSON made typed). Writers call it before writing, so they never write a manifest the
        runtime would refuse."""
        return Manifest.from_dict(self.to_dict(), where)

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> Manifest:
        top = At(where, "")
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object")
        if d.get("format") != FORMAT:
            raise BundleError(f"{where}: 'format' is {d.get('format')!r}, expected {FORMAT!r}")
        d = migrate(d, where)
        for key in ("model_name", "toolchain_version", "created", "spec", "stages", "files"):
            if key not in d:
                raise (top / key).error("required field is missing")
        for key in ("model_name", "toolchain_version", "created"):
            if not isinstance(d[key], str):
                raise (top / key).expected("a string", d[key])
        try:
            spec = FeatureSpec.from_dict(d["spec"])
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            raise BundleError(f"{where}: spec: the embedded spec is invalid: {e}") from e
        if d.get("precision", "fp32") not in PRECISIONS:
            raise (top / "precision").expected(f"one of {', '.join(PRECISIONS)}", d.get("precision"))
        values = {k: _load(k, d.get(k), top / k) for k in _LOADERS}
        m = cls(
            model_name=d["model_name"], spec=spec, toolchain_version=d["toolchain_version"],
            created=d["created"], precision=d.get("precision", "fp32"), format_version=FORMAT_VERSION,
            **{k: v for k, v in values.items() if v is not None or k in _NULLABLE},
        )
        m._check_stages(top)
        return m

    def _check_stages(self, top: At) -> None:
        if "full" not in self.stages:
            raise (top / "stages" / "full").error("required field is missing (every bundle has a full stage)")
        small = self.stages.get(SMALL_GROUP)
        if small is None:
            return
        if not {"user", "group"} <= set(self.stages) or self.split is None:
            raise (top / "stages" / SMALL_GROUP).error(
                f"stage '{SMALL_GROUP}' needs a split bundle (user and group stages, and a split section)")
        if small.max_rows is None:
            raise (top / "stages" / SMALL_GROUP / "max_rows").error(f"required field is missing: {MAX_ROWS_WHAT}")

    @classmethod
    def read(cls, bundle_dir: str | Path) -> Manifest:
        return cls.from_dict(cls.read_data(bundle_dir), where=str(Path(bundle_dir) / MANIFEST_NAME))

    @staticmethod
    def read_data(bundle_dir: str | Path) -> Any:
        """The parsed JSON of ``manifest.json`` (what a signature covers), not yet validated."""
        path = Path(bundle_dir) / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"'{bundle_dir}' is not a ugsep bundle: {MANIFEST_NAME} is missing")
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{path}: cannot parse manifest: {e}") from e


# manifest key -> how its JSON is read (None: the key's default)
_LOADERS: dict[str, Kind] = {
    "stages": MapOf(Sub(Stage), STAGES),
    "files": MapOf(Sub(FileEntry)),
    "split": Nullable(Sub(Split)),
    "flops": Sub(Flops),
    "parity": Nullable(Sub(Parity)),
    "source": Sub(Source),
    "limits": Sub(Limits),
    "quantization": Nullable(Sub(Quantization)),
    "engines": ListOf(Sub(Engine)),
    "optimize": Nullable(Sub(Optimize)),
    "row_scope": Nullable(Sub(RowScope)),
    "embeddings": Nullable(Sub(Embeddings)),
}
_NULLABLE = {"split", "parity", "quantization", "optimize", "row_scope", "embeddings"}


def _load(key: str, value: Any, at: At) -> Any:
    if value is None:
        return None
    return _LOADERS[key].load(value, at)


def _dump(v: Any) -> Any:
    """JSON of a section, a list/map of sections, or JSON given as is (checked on read)."""
    if isinstance(v, Section):
        return v.to_dict()
    if isinstance(v, list):
        return [_dump(x) for x in v]
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    return v
