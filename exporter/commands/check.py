"""``ugsep check``: load the eager reference named by the bundle, run parity, report."""

from __future__ import annotations

import argparse
from pathlib import Path

from exporter.errors import ExportError
from exporter.load import LoadedModel, load_student
from exporter.progress import console
from runtime.bundle import Bundle


def reference_for(
    bundle: Bundle,
    checkpoint: str | None = None,
    factory: str | None = None,
    trust: tuple[str, ...] | list[str] | None = None,
) -> LoadedModel:
    """The eager model a bundle was exported from (or ``checkpoint``), checked by sha256.

    A factory named by the manifest (``source.factory``) is data from a file: it is imported
    only from a ``trust``-ed module (exporter.trust). ``factory`` given by the caller is the
    caller's own choice.
    """
    src = bundle.manifest.source
    path = checkpoint or src.checkpoint
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
        factory=factory or src.factory,
        kwargs=src.kwargs,
        spec=bundle.manifest.spec,
        trust=trust,
        factory_from="the caller" if factory else f"the manifest of bundle '{bundle.root}'",
    )
    want = src.checkpoint_sha256
    got = loaded.source.get("checkpoint_sha256")
    if want and got != want:
        raise ExportError(
            f"checkpoint '{path}' (sha256 {got[:12]}…) is not the one bundle '{bundle.root}' "
            f"was exported from (sha256 {want[:12]}…)"
        )
    return loaded


def run_check(args: argparse.Namespace) -> int:
    from exporter.data import load_rows
    from exporter.steps.parity import check_bundle, load_budgets, write_html_report

    bundle = Bundle.open(args.bundle, key=args.verify, allow_extra_files=args.allow_extra_files)
    if args.trt_lint:
        from exporter.steps.tensorrt import lint_bundle

        return lint_bundle(bundle.root)
    if args.bundle_only:
        return _check_bundle_only(bundle, args)
    loaded = reference_for(bundle, args.checkpoint, args.factory, args.trust_module)
    rows = load_rows(args.data, loaded.spec) if args.data else None
    report = check_bundle(
        bundle.root,
        loaded.eager(),
        rows=rows,
        n_rows=args.rows,
        seed=args.seed,
        budgets=load_budgets(args.budgets) if args.budgets else None,
        allow_extra_files=args.allow_extra_files,
    )
    console.print(report.table())
    if args.report:
        write_html_report(report, args.report)
        console.print(f"HTML report: {args.report}")
    if not report.passed:
        console.print(f"[red]parity FAILED[/red] for: {', '.join(report.failed_stages)}")
        for st in report.stages:  # a stage that differs between server configurations
            bad = [c["name"] for c in st.configs if not c["passed"]]
            if bad:
                console.print(f"  {st.name} fails in configuration(s): {', '.join(bad)}")
        return 1
    console.print("[green]parity passed[/green]")
    return 0


def _check_bundle_only(bundle: Bundle, args: argparse.Namespace) -> int:
    """Check a bundle without its eager model: nothing the manifest names is imported.

    The files are verified on open; the recorded parity verdict is reported; every other
    compiled stage is compared with ``onnx-full`` on rows sampled from the spec, within the
    stage's budgets. Exit 1 when the recorded verdict failed or a stage disagrees.
    """
    import numpy as np

    from exporter.evaluate.metrics import request_groups
    from exporter.evaluate.stages import bundle_stages
    from exporter.steps.parity import load_budgets, output_metrics
    from runtime.sample import sample_requests

    m = bundle.manifest
    recorded = m.parity.passed if m.parity else None
    console.print(f"bundle '{bundle.root}': files verified; recorded parity: "
                  + {True: "passed", False: "FAILED", None: "none"}[recorded])
    budgets = load_budgets(args.budgets) if args.budgets else load_budgets(None)
    n = args.rows or 1000
    per = max(1, min(100, n))
    rows, rid = sample_requests(m.spec, max(1, n // per), per, seed=args.seed)
    groups = request_groups(rid)
    stages = [s for s in bundle_stages(bundle) if s.run is not None]
    reference = stages[0].run(rows)  # onnx-full: the unsplit graph of the same precision
    ok = recorded is True
    for st in stages[1:]:
        got = st.run(rows)
        for name, ref in reference.items():
            metrics = output_metrics(ref, got[name], None, groups)
            breaches, _ = evaluate_budgets(metrics, budgets.for_stage(st.name, st.precision))
            worst = float(np.max(np.abs(ref - got[name])))
            verdict = "ok" if not breaches else "[red]differs[/red]: " + "; ".join(breaches)
            console.print(f"  {st.name} vs {stages[0].name} [{name}]: max abs {worst:.3g} {verdict}")
            ok = ok and not breaches
    if not ok:
        console.print("[red]bundle check FAILED[/red]")
        return 1
    console.print("[green]bundle check passed[/green] (no eager model: pass the checkpoint for parity)")
    return 0


def evaluate_budgets(metrics, limits):
    from exporter.evaluate.budgets import evaluate

    return evaluate(metrics, limits)
