"""The bundle manifest: the contract between the exporter (writes) and the runtime (reads).

``manifest.json`` sits at the root of a bundle. Its schema is versioned by
``FORMAT_VERSION``; the runtime refuses versions it does not know. Keys:

    format             "ugsep-bundle"
    format_version     int
    model_name         str
    toolchain_version  str            ugsep version that wrote it
    created            ISO-8601 UTC
    spec               FeatureSpec.to_dict()
    precision          "fp32" | "w8a16" | "w4a16" | "w8a8"
    stages             {stage: {"file": str, "inputs": [...], "outputs": [...]}}
                       stage in "full" (always), "user" and "group" (when split), and
                       "group_small" (optional, split only): a second group graph the
                       runtime runs instead of "group" for calls of at most its
                       "max_rows" candidates (an int >= 1 in its entry); the export
                       builds it when a graph tuned at batch 1 beats the group graph
                       tuned for large batches (exporter/steps/quant_tune.py). Any stage may
                       carry "intra_op_threads" (an int >= 1): the CPU backend runs that
                       stage on at most that many intra-op threads, the fastest count
                       timed at export for the small-batch stages (exporter/steps/threads.py)
    split              null | {"boundary": [{"name", "dtype", "shape", "source"}],
                               "user_index": "user_index", "report": {...}}
    flops              {"full_per_row", "user_per_row", "group_per_row"} (ints, may be null)
    files              {relative path: {"sha256": hex, "bytes": int}} for every file but this one
    parity             null | {"passed": bool, "summary": {...}, "report": "parity.json"}
    source             {"checkpoint_sha256": hex|null, "factory": str|null, ...}
    limits             {"max_candidates": int, "max_users_per_call": int}
    quantization       null | {...}   written by the quantization passes
    engines            [{"dir", "gpu", "compute_capability", "trt_version", "files"}]
    optimize           null | {"per_token_layout", "cpu", "serve_threads", "stage_threads"}:
                       the speed choices the export timed (layouts, threads per stage)
    row_scope          null | {"full": scope, "user": scope, "group": scope, "mixing": [...]}
                       per stage side, proven at export (graph_passes/fx/row_scope.py):
                       "rows" = each row's outputs depend on that row only (requests may
                       share a call), "request" = rows of a call mix (listwise scores,
                       batch statistics): the runtime scores each request in its own call.
                       null (bundles written before the proof): treated as "rows"
    embeddings         null | {"file", "dtype", "tables", "lookups", "in_graph", ...}: embedding
                       tables outside the graphs, in a memory-mapped safetensors file the
                       runtime looks rows up in (runtime/embstore.py, docs/embedding-store.md)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.embstore import check_section as check_embeddings
from runtime.errors import BundleError
from runtime.spec import FeatureSpec

FORMAT = "ugsep-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "w8a16", "w4a16", "w8a8")
STAGES = ("full", "user", "group", "group_small")
SMALL_GROUP = "group_small"
ROW_SCOPES = ("rows", "request")
DEFAULT_LIMITS = {"max_candidates": 4096, "max_users_per_call": 256}


@dataclass
class Manifest:
    """In-memory form of ``manifest.json``; ``to_dict``/``from_dict`` round-trip exactly."""

    model_name: str
    spec: FeatureSpec
    stages: dict[str, dict[str, Any]]
    files: dict[str, dict[str, Any]]
    toolchain_version: str
    created: str
    precision: str = "fp32"
    split: dict[str, Any] | None = None
    flops: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    quantization: dict[str, Any] | None = None
    engines: list[dict[str, Any]] = field(default_factory=list)
    optimize: dict[str, Any] | None = None  # what the export's optimize step chose, and why
    row_scope: dict[str, Any] | None = None  # proven per side: "rows" or "request"
    embeddings: dict[str, Any] | None = None  # the embedding store (runtime/embstore.py)
    format_version: int = FORMAT_VERSION

    @property
    def is_split(self) -> bool:
        return self.split is not None and "user" in self.stages and "group" in self.stages

    @property
    def small_group_rows(self) -> int:
        """Calls of at most this many candidates run ``group_small`` (0: no such stage)."""
        st = self.stages.get(SMALL_GROUP)
        return int(st["max_rows"]) if st and self.is_split else 0

    @property
    def request_scoped(self) -> bool:
        """True when the served graph mixes the rows of a call: one request per group call."""
        return self.mixes_rows("group" if self.is_split else "full")

    def mixes_rows(self, side: str) -> bool:
        """Whether ``side`` ("full", "user", "group") was proven to mix rows ("request")."""
        scope = self.row_scope or {}
        return scope.get(side, scope.get("full")) == "request"

    def stage_threads(self, stage: str) -> int | None:
        """The most intra-op threads worth using for ``stage`` on a CPU (None: no cap)."""
        return (self.stages.get(stage) or {}).get("intra_op_threads")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "model_name": self.model_name,
            "toolchain_version": self.toolchain_version,
            "created": self.created,
            "spec": self.spec.to_dict(),
            "precision": self.precision,
            "stages": self.stages,
            "split": self.split,
            "flops": self.flops,
            "files": self.files,
            "parity": self.parity,
            "source": self.source,
            "limits": self.limits,
            "quantization": self.quantization,
            "engines": self.engines,
            "optimize": self.optimize,
            "row_scope": self.row_scope,
            **({"embeddings": self.embeddings} if self.embeddings else {}),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> Manifest:
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object")
        if d.get("format") != FORMAT:
            raise BundleError(f"{where}: 'format' is {d.get('format')!r}, expected {FORMAT!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where}: format_version {version!r} is not supported by this runtime "
                f"(it reads version {FORMAT_VERSION}); re-export the bundle with this ugsep"
            )
        for key in ("model_name", "toolchain_version", "created", "spec", "stages", "files"):
            if key not in d:
                raise BundleError(f"{where}: required key '{key}' is missing")
        try:
            spec = FeatureSpec.from_dict(d["spec"])
        except ValueError as e:
            raise BundleError(f"{where}: embedded spec is invalid: {e}") from e
        stages = d["stages"]
        if not isinstance(stages, dict) or "full" not in stages:
            raise BundleError(f"{where}: 'stages' must contain at least 'full'")
        for name, st in stages.items():
            if name not in STAGES or not isinstance(st, dict) or "file" not in st:
                raise BundleError(f"{where}: stage {name!r} is malformed: {st!r}")
            threads = st.get("intra_op_threads")
            if threads is not None and (
                isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
            ):
                raise BundleError(
                    f"{where}: stage {name!r} has 'intra_op_threads' {threads!r}, expected an "
                    "int >= 1 (the most threads to run it on) or no such key"
                )
        if SMALL_GROUP in stages:
            rows = stages[SMALL_GROUP].get("max_rows")
            if not {"user", "group"} <= set(stages) or d.get("split") is None:
                raise BundleError(
                    f"{where}: stage '{SMALL_GROUP}' needs a split bundle (user and group stages)"
                )
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
                raise BundleError(
                    f"{where}: stage '{SMALL_GROUP}' needs 'max_rows', an int >= 1 (the largest "
                    f"candidate count it serves), got {rows!r}"
                )
        _check_row_scope(d.get("row_scope"), where)
        check_embeddings(d.get("embeddings"), where)
        if d.get("precision", "fp32") not in PRECISIONS:
            raise BundleError(f"{where}: precision {d.get('precision')!r} not in {PRECISIONS}")
        files = d["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()
        ):
            raise BundleError(f"{where}: 'files' must map paths to {{'sha256': ...}}")
        return cls(
            model_name=d["model_name"],
            spec=spec,
            stages=stages,
            files=files,
            toolchain_version=d["toolchain_version"],
            created=d["created"],
            precision=d.get("precision", "fp32"),
            split=d.get("split"),
            flops=d.get("flops") or {},
            parity=d.get("parity"),
            source=d.get("source") or {},
            limits={**DEFAULT_LIMITS, **(d.get("limits") or {})},
            quantization=d.get("quantization"),
            engines=d.get("engines") or [],
            optimize=d.get("optimize"),
            row_scope=d.get("row_scope"),
            embeddings=d.get("embeddings"),
            format_version=version,
        )

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


def _check_row_scope(scope: Any, where: str) -> None:
    if scope is None:
        return
    bad = not isinstance(scope, dict) or any(
        scope.get(side) not in ROW_SCOPES for side in ("full", "user", "group") if side in scope
    )
    if bad or "full" not in scope:
        raise BundleError(
            f"{where}: 'row_scope' must map 'full' (and 'user'/'group' when split) to one of "
            f"{list(ROW_SCOPES)}, got {scope!r}; re-export the bundle"
        )
