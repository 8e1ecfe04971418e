"""``ugsep check``: load the eager reference named by the bundle, run parity, report."""

from __future__ import annotations

import argparse
from pathlib import Path

from exporter.errors import ExportError
from exporter.load import LoadedModel, load_student
from exporter.progress import console
from runtime.bundle import Bundle


def reference_for(bundle: Bundle, checkpoint: str | None = None, factory: str | None = None) -> LoadedModel:
    """The eager model a bundle was exported from (or ``checkpoint``), checked by sha256."""
    src = bundle.manifest.source or {}
    path = checkpoint or src.get("checkpoint")
    if not path:
        raise ExportError(
            f"bundle '{bundle.root}' records no source checkpoint; pass --checkpoint"
        )
    if not Path(path).exists():
        raise ExportError(
            f"the bundle's source checkpoint '{path}' does not exist here; pass --checkpoint"
        )
    loaded = load_student(
        path,
        factory=factory or src.get("factory"),
        kwargs=src.get("kwargs"),
        spec=bundle.manifest.spec,
    )
    want = src.get("checkpoint_sha256")
    got = loaded.source.get("checkpoint_sha256")
    if want and got != want:
        raise ExportError(
            f"checkpoint '{path}' (sha256 {got[:12]}…) is not the one bundle '{bundle.root}' "
            f"was exported from (sha256 {want[:12]}…)"
        )
    return loaded


def run_check(args: argparse.Namespace) -> int:
    from exporter.data import load_rows
    from exporter.parity import check_bundle, load_budgets, write_html_report

    bundle = Bundle.open(args.bundle)
    if args.trt_lint:
        from exporter.tensorrt import lint_bundle

        return lint_bundle(bundle.root)
    loaded = reference_for(bundle, args.checkpoint, args.factory)
    rows = load_rows(args.data, loaded.spec) if args.data else None
    report = check_bundle(
        bundle.root,
        loaded.eager(),
        rows=rows,
        n_rows=args.rows,
        seed=args.seed,
        budgets=load_budgets(args.budgets) if args.budgets else None,
    )
    console.print(report.table())
    if args.report:
        write_html_report(report, args.report)
        console.print(f"HTML report: {args.report}")
    if not report.passed:
        console.print(f"[red]parity FAILED[/red] for: {', '.join(report.failed_stages)}")
        return 1
    console.print("[green]parity passed[/green]")
    return 0
