"""The parity report: per-stage results, pass/fail, JSON form, terminal table, bundle record."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.manifest import Parity

REPORT_NAME = "parity.json"
REPORT_VERSION = 1


@dataclass
class StageResult:
    """How one compiled stage compares with the eager reference."""

    name: str
    precision: str
    status: str  # "passed" | "failed" | "skipped" | "error"
    reason: str | None = None
    budgets: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    breaches: dict[str, list[str]] = field(default_factory=dict)
    not_evaluated: list[str] = field(default_factory=list)
    localisation: dict[str, Any] | None = None
    configs: list[dict[str, Any]] = field(default_factory=list)  # server configurations
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # not serialised

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "error")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "precision": self.precision,
            "status": self.status,
            "reason": self.reason,
            "budgets": self.budgets,
            "outputs": _clean(self.outputs),
            "breaches": self.breaches,
            "not_evaluated": self.not_evaluated,
            "localisation": self.localisation,
            "configs": _clean(self.configs),
        }

    def headline(self, output: str) -> dict[str, Any]:
        """The few numbers a person reads first, for one output."""
        m = self.outputs.get(output, {})
        pick = {
            "max_abs": m.get("max_abs"),
            "mean_abs": m.get("mean_abs"),
            "cosine": m.get("cosine"),
            "delta_auc": m.get("delta_auc"),
            "delta_auc_ci": _interval(m.get("delta_auc_ci")),
            "top10_overlap_mean": (m.get("top10_overlap") or {}).get("mean"),
            "top50_overlap_mean": (m.get("top50_overlap") or {}).get("mean"),
            "kendall_tau_mean": (m.get("kendall_tau") or {}).get("mean"),
        }
        return _clean(pick)


@dataclass
class ParityReport:
    """Everything ``check_bundle`` found; ``to_dict`` is what parity.json holds."""

    bundle: str
    model_name: str
    precision: str
    seed: int
    rows: dict[str, Any]
    outputs: list[str]
    stages: list[StageResult]
    reference: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        """True when no stage breached its budgets or errored (skipped stages do not fail)."""
        return not self.failed_stages and any(s.status == "passed" for s in self.stages)

    @property
    def failed_stages(self) -> list[str]:
        return [s.name for s in self.stages if s.failed]

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage '{name}' in this report ({[s.name for s in self.stages]})")

    def summary(self) -> dict[str, Any]:
        """Per stage: status and headline numbers per output (what the manifest records)."""
        return {
            s.name: {
                "status": s.status,
                **({"reason": s.reason} if s.reason else {}),
                **({"outputs": {o: s.headline(o) for o in s.outputs}} if s.outputs else {}),
            }
            for s in self.stages
        }

    def manifest_record(self) -> Parity:
        """The ``manifest.parity`` section (the runtime guard reads passed / failed_stages)."""
        return Parity(
            passed=self.passed,
            failed_stages=self.failed_stages,
            summary=self.summary(),
            report=REPORT_NAME,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "bundle_model": self.model_name,
            "precision": self.precision,
            "seed": self.seed,
            "rows": self.rows,
            "outputs": self.outputs,
            "passed": self.passed,
            "failed_stages": self.failed_stages,
            "stages": [s.to_dict() for s in self.stages],
        }

    def table(self):
        """A rich Table: one line per stage and output."""
        from exporter.steps.parity._table import parity_table

        return parity_table(self)

    def write(self, bundle_dir: str | Path) -> None:
        """parity.json into the bundle, listed with its sha256; manifest.parity updated atomically."""
        from exporter.steps.write import update_bundle

        update_bundle(bundle_dir, {REPORT_NAME: self.to_dict()}, parity=self.manifest_record())


def _interval(ci: dict[str, Any] | None) -> list[float] | None:
    """[low, high] of a ΔAUC interval record (auc_noise.delta_auc_interval)."""
    return None if not ci else [ci["ci_low"], ci["ci_high"]]


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
