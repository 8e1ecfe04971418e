"""Parity: prove every compiled stage of a bundle ranks like the eager fp32 model.

    report = check_bundle(bundle_dir, model)          # eager vs onnx-full / onnx-split / …
    report.passed, report.failed_stages, report.table(), report.to_dict()
    write_html_report(report, "report.html")

The report is written to the bundle's parity.json and summarised in
``manifest.parity`` (which ``runtime.load`` checks before serving).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from exporter.evaluate.budgets import DEFAULTS, LIMITS, Budgets, load_budgets
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
    "step_parity",
]

if TYPE_CHECKING:
    from exporter.pipeline import ExportContext


def write_html_report(report: ParityReport, path):
    """A self-contained HTML page: tables and, per stage, a scatter and an error histogram."""
    from exporter.steps.parity.html import write_html_report as _write

    return _write(report, path)


def step_parity(ctx: ExportContext) -> None:
    """Eager fp32 vs every stage just written; parity.json + manifest.parity in the bundle."""
    from exporter.progress import console

    o = ctx.options
    n_parity, _ = ctx.row_budget()
    ctx.parity_report = check_bundle(
        ctx.out_dir,
        ctx.loaded.eager(),
        rows=o.data,
        n_rows=n_parity,
        seed=o.seed,
        budgets=o.budgets,
        program=ctx.captured or ctx.program,
        progress=False,
    )
    console.print(ctx.parity_report.table())
