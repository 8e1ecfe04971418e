"""Parity budgets: the limits a compiled stage must meet against the eager fp32 model.

Defaults depend on the stage's precision: fp32 stages must match the reference
element by element (max abs error ≤ 1e-5); quantized stages are judged by what a
ranker cares about — AUC and log-loss deltas and per-request top-k agreement —
plus a loose element bound. Overrides come from a dict or a JSON / YAML file:

    max_abs: 2.0e-5                 # flat keys apply to every precision
    w8a16: {top10_overlap_mean: 0.9}  # keys under a precision apply to it
    stages: {onnx-split: {max_abs: 1e-4}}  # and under a stage name to that stage

Each key is ``<metric>`` with a fixed direction (see ``LIMITS``); a metric that
cannot be computed (no labels for AUC, no request with more than k candidates)
is reported as not evaluated rather than passed.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import ExportError

# budget key -> (path into a stage's per-output metrics, "max" = value ≤ limit | "min" = ≥)
LIMITS: dict[str, tuple[tuple[str, ...], str]] = {
    "max_abs": (("max_abs",), "max"),
    "mean_abs": (("mean_abs",), "max"),
    "max_rel": (("max_rel",), "max"),
    "mean_rel": (("mean_rel",), "max"),
    "cosine": (("cosine",), "min"),
    "nonfinite": (("nonfinite",), "max"),
    "abs_delta_auc": (("abs_delta_auc",), "max"),
    "abs_delta_logloss": (("abs_delta_logloss",), "max"),
    "top10_overlap_mean": (("top10_overlap", "mean"), "min"),
    "top10_overlap_min": (("top10_overlap", "min"), "min"),
    "top50_overlap_mean": (("top50_overlap", "mean"), "min"),
    "kendall_tau_mean": (("kendall_tau", "mean"), "min"),
    "kendall_tau_p5": (("kendall_tau", "p5"), "min"),
}

FP32 = {"max_abs": 1e-5, "nonfinite": 0}
QUANTIZED = {
    "max_abs": 0.05,
    "nonfinite": 0,
    "abs_delta_auc": 1e-4,
    "top10_overlap_mean": 0.95,
}
DEFAULTS: dict[str, dict[str, float]] = {
    "fp32": FP32,
    "fp16": {"max_abs": 1e-3, "nonfinite": 0, "top10_overlap_mean": 0.98},
    "w8a16": QUANTIZED,
    "w4a16": {**QUANTIZED, "max_abs": 0.1, "abs_delta_auc": 5e-4, "top10_overlap_mean": 0.9},
}


@dataclass
class Budgets:
    """Per-precision limits plus per-stage overrides; ``for_stage`` resolves one stage's set."""

    by_precision: dict[str, dict[str, float]] = field(
        default_factory=lambda: copy.deepcopy(DEFAULTS)
    )
    by_stage: dict[str, dict[str, float]] = field(default_factory=dict)

    def for_stage(self, stage: str, precision: str) -> dict[str, float]:
        base = self.by_precision.get(precision, self.by_precision["fp32"])
        return {**base, **self.by_stage.get(stage, {})}

    def to_dict(self) -> dict[str, Any]:
        return {"by_precision": self.by_precision, "by_stage": self.by_stage}


def _check_keys(where: str, limits: Any) -> dict[str, float]:
    if not isinstance(limits, dict):
        raise ExportError(f"budgets {where}: expected a mapping of metric -> limit, got {limits!r}")
    out = {}
    for key, value in limits.items():
        if key not in LIMITS:
            raise ExportError(
                f"budgets {where}: unknown metric '{key}'; known: {', '.join(LIMITS)}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ExportError(f"budgets {where}: limit for '{key}' must be a number, got {value!r}")
        out[key] = float(value)
    return out


def load_budgets(source: str | Path | dict[str, Any] | Budgets | None) -> Budgets:
    """Defaults updated by a dict or a JSON/YAML file (see the module docstring for the layout)."""
    if isinstance(source, Budgets):
        return source
    budgets = Budgets()
    if source is None:
        return budgets
    data = _read(source) if isinstance(source, (str, Path)) else source
    if not isinstance(data, dict):
        raise ExportError(f"budgets must be a mapping, got {type(data).__name__}")
    flat = {k: v for k, v in data.items() if k in LIMITS}
    for key, value in data.items():
        if key in LIMITS:
            continue
        if key == "stages":
            if not isinstance(value, dict):
                raise ExportError("budgets 'stages' must map stage names to limits")
            for stage, limits in value.items():
                budgets.by_stage[stage] = _check_keys(f"for stage '{stage}'", limits)
        elif key in DEFAULTS:
            budgets.by_precision[key].update(_check_keys(f"for precision '{key}'", value))
        else:
            raise ExportError(
                f"budgets: unknown key '{key}'; use a metric ({', '.join(LIMITS)}), a precision "
                f"({', '.join(DEFAULTS)}) or 'stages'"
            )
    flat = _check_keys("(top level)", flat)
    for limits in budgets.by_precision.values():
        limits.update(flat)
    return budgets


def _read(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"budgets file '{path}' does not exist")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(path.read_text())
        return json.loads(path.read_text())
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user error
        raise ExportError(f"cannot parse budgets file '{path}': {e}") from e


def evaluate(metrics: dict[str, Any], limits: dict[str, float]) -> tuple[list[str], list[str]]:
    """(breaches, not evaluated) of one output's metrics against ``limits``; breaches are readable.

    ``abs_delta_auc`` with an interval (``delta_auc_ci``) is judged by
    ``exporter.evaluate.auc_noise.judge_auc``: by the interval when it resolves the budget,
    else by the logit error relative to the score spread."""
    from exporter.evaluate.auc_noise import judge_auc

    breaches, skipped = [], []
    for key, limit in limits.items():
        if key == "abs_delta_auc" and metrics.get("delta_auc_ci"):  # judged with its interval
            ok, _, text = judge_auc(metrics, limit)
            if not ok:
                breaches.append(text)
            continue
        path, direction = LIMITS[key]
        value: Any = metrics
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None or value != value:  # missing or NaN
            skipped.append(key)
            continue
        ok = value <= limit if direction == "max" else value >= limit
        if not ok:
            op = "≤" if direction == "max" else "≥"
            breaches.append(f"{key} = {value:.4g} (budget {op} {limit:g})")
    return breaches, skipped
