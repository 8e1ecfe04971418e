"""Parity: prove every compiled stage of a bundle ranks like the eager fp32 model.

    report = check_bundle(bundle_dir, model)          # eager vs onnx-full / onnx-split / …
    report.passed, report.failed_stages, report.table(), report.to_dict()
    write_html_report(report, "report.html")

The report is written to the bundle's parity.json and summarised in
``manifest.parity`` (which ``runtime.load`` checks before serving).
"""

from __future__ import annotations

from exporter.steps.parity.budgets import DEFAULTS, LIMITS, Budgets, load_budgets
from exporter.steps.parity.check import check_bundle, output_metrics
from exporter.steps.parity.report import REPORT_NAME, ParityReport, StageResult

__all__ = [
    "check_bundle",
    "output_metrics",
    "ParityReport",
    "StageResult",
    "Budgets",
    "load_budgets",
    "DEFAULTS",
    "LIMITS",
    "REPORT_NAME",
    "write_html_report",
]


def write_html_report(report: ParityReport, path):
    """A self-contained HTML page: tables and, per stage, a scatter and an error histogram."""
    from exporter.steps.parity.html import write_html_report as _write

    return _write(report, path)
