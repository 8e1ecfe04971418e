"""``check_bundle``: the eager fp32 model against every compiled stage of a bundle, on the same rows."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.errors import ExportError
from exporter.evaluate import auc_noise
from exporter.evaluate import configs as C
from exporter.evaluate import metrics as M
from exporter.evaluate.budgets import Budgets, evaluate, load_budgets
from exporter.evaluate.metrics import output_metrics
from exporter.evaluate.stages import (
    Outputs,
    Rows,
    Stage,
    bundle_stages,
    eager_outputs,
    user_rows,
)
from exporter.progress import console
from exporter.steps.parity.report import ParityReport, StageResult
from runtime.bundle import Bundle
from runtime.sample import sample_requests
from runtime.spec import FeatureSpec

log = logging.getLogger(__name__)
CANDIDATES_PER_REQUEST = 100
BATCH_ROWS = 512
RESERVED = ("label", "request_id", "prob")


def check_bundle(
    bundle_dir: str | Path,
    model: torch.nn.Module,
    *,
    rows: Rows | None = None,
    labels: np.ndarray | None = None,
    request_ids: np.ndarray | None = None,
    n_rows: int | None = 1000,
    seed: int = 0,
    budgets: Budgets | dict | str | Path | None = None,
    stages: list[str] | None = None,
    progress: bool = True,
    write: bool = True,
    program: Any = None,
    localise: bool = True,
    configs: bool = True,
    allow_extra_files: bool = False,
) -> ParityReport:
    """Compare every compiled stage of ``bundle_dir`` with ``model`` (eager fp32) and record it.

    ``rows``: arrays by spec input name, optionally with ``label`` and ``request_id``; the
    first ``n_rows`` are used (all when None). Without them, ``n_rows`` (default 1000) rows
    are sampled from the spec with ``seed``, in requests of one user and 100 candidates. With ``write`` the report goes to the bundle's
    parity.json and its summary to ``manifest.parity``. A failing stage is localised to the
    first diverging tensor (``program``: the model's ExportedProgram, captured when None).

    The reference is the eager model run once per request. Each stage is scored on whole
    requests (several per call for a row-wise bundle, one per call for a request-scoped
    one), and with ``configs`` every runtime stage is also scored in each configuration
    the server uses (exporter.evaluate.configs: per request, merged through the batcher,
    batch 1, batch max), each against the same reference: a breach in one names it.
    """
    if write and not Path(bundle_dir).is_dir():
        raise ExportError(
            f"cannot write parity.json into '{bundle_dir}': not a bundle directory "
            "(unpack the archive, or pass write=False)"
        )
    bundle = Bundle.open(bundle_dir, allow_extra_files=allow_extra_files)  # files unlisted: ignored
    spec = bundle.manifest.spec
    budgets = load_budgets(budgets)
    rows, labels, request_ids, source = _prepare_rows(spec, rows, labels, request_ids, n_rows, seed)
    groups = M.request_groups(request_ids)
    n = len(request_ids)
    model = model.eval()
    get_program = _program_cache(model, spec, program)
    todo = bundle_stages(bundle, stages, program=get_program)
    scoped = bundle.manifest.request_scoped
    with _progress(progress, len(todo) + 1, n) as bar:
        eager = lambda r: eager_outputs(model, spec, r)  # noqa: E731
        reference = _run_batched(eager, rows, bar, "eager fp32", groups)  # per request
        chunks = groups if scoped else list(C.request_chunks(groups, BATCH_ROWS))
        results = [
            _check_stage(st, rows, reference, labels, groups, budgets, bar, chunks, configs)
            for st in todo
        ]
    report = ParityReport(
        bundle=str(bundle.root),
        model_name=bundle.manifest.model_name,
        precision=bundle.manifest.precision,
        seed=seed,
        rows={"n": n, "requests": len(groups), "source": source, "labels": labels is not None},
        outputs=list(spec.outputs),
        stages=results,
        reference=reference,
        labels=labels,
    )
    if localise and not report.passed:
        _localise_failures(report, bundle, model, spec, rows, get_program)
    if write:
        report.write(bundle_dir)
    return report


def _prepare_rows(spec: FeatureSpec, rows, labels, request_ids, n_rows: int | None, seed: int):
    if rows is None:
        n_rows = n_rows or 1000
        per = max(1, min(CANDIDATES_PER_REQUEST, n_rows))
        rows, rid = sample_requests(spec, max(1, n_rows // per), per, seed=seed)
        return rows, labels, (rid if request_ids is None else request_ids), "sampled"
    missing = [s.name for s in spec.inputs if s.name not in rows]
    if missing:
        raise ExportError(f"parity rows lack input(s) {missing} of spec '{spec.name}'")
    total = len(rows[spec.inputs[0].name])
    n = total if n_rows is None else min(total, n_rows)
    if labels is None and "label" in rows:
        labels = rows["label"]
    if request_ids is None and "request_id" in rows:
        request_ids = rows["request_id"]
    feats = {s.name: np.ascontiguousarray(rows[s.name][:n]) for s in spec.inputs}
    if request_ids is None:  # one request per distinct user
        request_ids = user_rows(spec, feats)[1]
    labels = None if labels is None else np.asarray(labels)[:n]
    return feats, labels, np.asarray(request_ids)[:n], "data"


def _run_batched(run, rows: Rows, bar, label: str, chunks) -> Outputs:
    """``run`` on each chunk of row indices (whole requests), outputs in row order."""
    n = len(next(iter(rows.values())))
    task = bar.add_task(label, total=n) if bar else None

    def counted(part: Rows) -> Outputs:
        out = run(part)
        if bar:
            bar.advance(task, len(next(iter(part.values()))))
        return out

    return C.run_in_chunks(counted, rows, chunks)


def _check_stage(
    stage: Stage,
    rows: Rows,
    reference: Outputs,
    labels,
    groups,
    budgets: Budgets,
    bar,
    chunks=None,
    configs: bool = True,
) -> StageResult:
    limits = budgets.for_stage(stage.name, stage.precision)
    result = StageResult(stage.name, stage.precision, "skipped", budgets=limits)
    if stage.run is None:
        result.reason = stage.skip_reason
        return result
    try:
        got = _run_batched(stage.run, rows, bar, stage.name, chunks or groups)
        if configs and stage.scorer is not None:
            result.configs = _check_configs(stage, rows, reference, labels, groups, limits)
    except Exception as e:  # noqa: BLE001 - a stage that cannot run fails parity, with the reason
        log.exception("parity stage %s failed to run", stage.name)
        result.status, result.reason = "error", f"{type(e).__name__}: {e}"
        return result
    result.scores = got
    skipped: set[str] = set()
    for name, ref in reference.items():
        result.outputs[name] = output_metrics(ref, got[name], labels, groups)
        _record_auc_verdict(result.outputs[name], limits)
        breaches, not_eval = evaluate(result.outputs[name], limits)
        skipped.update(not_eval)
        breaches += [b for c in result.configs for b in c["breaches"].get(name, [])]
        if breaches:
            result.breaches[name] = breaches
    result.not_evaluated = sorted(skipped)
    result.status = "failed" if result.breaches else "passed"
    return result


def _record_auc_verdict(metrics: dict[str, Any], limits: dict[str, float]) -> None:
    """metrics["auc_verdict"]: how the |ΔAUC| budget was decided (interval or logit error)."""
    if "abs_delta_auc" in limits and metrics.get("delta_auc_ci"):
        ok, mode, text = auc_noise.judge_auc(metrics, limits["abs_delta_auc"])
        metrics["auc_verdict"] = {"passed": ok, "mode": mode, "text": text}


def _check_configs(stage: Stage, rows: Rows, reference: Outputs, labels, groups, limits):
    """Each server configuration of ``stage`` vs the per-request eager reference."""
    spec = stage.scorer().spec
    out = []
    for name, what, got in C.config_runs(stage.scorer(), spec, rows, groups):
        m = len(next(iter(got.values())))
        sub = [g for g in groups if g.max() < m] if m < len(reference[spec.outputs[0]]) else groups
        rec: dict[str, Any] = {"name": name, "what": what, "rows": m, "outputs": {}, "breaches": {}}
        for o, ref in reference.items():
            met = output_metrics(ref[:m], got[o], None if labels is None else labels[:m], sub)
            rec["outputs"][o] = {k: met.get(k) for k in ("max_abs", "mean_abs")}
            bad = evaluate(met, limits)[0]
            if bad:
                rec["breaches"][o] = [f"in configuration {name} ({what}): {b}" for b in bad]
        rec["passed"] = not rec["breaches"]
        out.append(rec)
    return out


def _program_cache(model: torch.nn.Module, spec: FeatureSpec, program: Any):
    """The model's ExportedProgram, captured on first use (split-eager, localisation)."""
    from exporter.program import ProgramModule

    if program is None and isinstance(model, ProgramModule):
        program = model.program  # a .pt2 archive: already captured
    holder = {"program": program}

    def get():
        if holder["program"] is None:
            from exporter.steps.capture import capture

            holder["program"] = capture(model, spec)
        return holder["program"]

    return get


def _localise_failures(report, bundle, model, spec, rows, get_program) -> None:
    from exporter.steps.parity.localise import localise_stage

    for st in report.stages:
        if st.status == "failed":
            try:
                st.localisation = localise_stage(
                    bundle, st.name, model, spec, rows, program=get_program()
                )
            except Exception as e:  # noqa: BLE001 - a report without localisation beats none
                log.warning("could not localise stage %s: %s", st.name, e)
                st.localisation = {"note": f"localisation failed: {type(e).__name__}: {e}"}


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool, n_tasks: int, n_rows: int):
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("parity {task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    )
