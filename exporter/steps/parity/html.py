"""The HTML parity report: one self-contained page (PNG plots embedded as base64).

Per stage that ran: a scatter of stage score against reference score (with the
y = x line) and a histogram of the errors, beside the tables the terminal shows,
the budgets, and where a failing stage first diverged.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from exporter.steps.parity._table import COLUMNS, auc_note
from exporter.steps.parity.report import ParityReport, StageResult

MAX_POINTS = 5000  # scatter points per plot (a deterministic subsample beyond that)
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.passed{color:#080}.failed,.error{color:#c00;font-weight:bold}
.skipped{color:#888}.plots img{width:420px;height:auto;margin-right:12px;border:1px solid #eee}
code,pre{background:#f6f6f6;padding:2px 4px}h2{margin-top:32px;border-bottom:1px solid #ddd}
"""


def write_html_report(report: ParityReport, path: str | Path) -> Path:
    """Write the report page to ``path`` (parent directories created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(report), encoding="utf-8")
    tmp.replace(path)
    return path


def render(report: ParityReport) -> str:
    """The whole page as a string."""
    verdict = "passed" if report.passed else "failed"
    r = report.rows
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>ugsep parity: "
        f"{_e(report.model_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Parity: {_e(report.model_name)} <span class='{verdict}'>{verdict.upper()}</span></h1>",
        f"<p>Bundle <code>{_e(report.bundle)}</code>, precision {_e(report.precision)}; "
        f"reference: the eager fp32 model. {r['n']} rows in {r['requests']} requests "
        f"({_e(r['source'])}{', with labels' if r.get('labels') else ''}), seed {report.seed}.</p>",
        _summary_table(report),
    ]
    for stage in report.stages:
        parts.append(_stage_section(report, stage))
    parts.append("</body></html>")
    return "\n".join(parts)


def _e(x: Any) -> str:
    return html.escape(str(x))


def _summary_table(report: ParityReport) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h, _, _ in COLUMNS)
    rows = []
    for s in report.stages:
        for out in list(s.outputs) or [None]:
            h = s.headline(out) if out else {}
            cells = "".join(
                f"<td>{'–' if h.get(k) is None else _e(fmt.format(h[k]))}</td>"
                for _, k, fmt in COLUMNS
            )
            notes = "; ".join(s.breaches.get(out, [])) if out else (s.reason or "")
            notes = "; ".join(x for x in (notes, auc_note(s, out)) if x)
            rows.append(
                f"<tr><td>{_e(s.name)}</td><td>{_e(out or '–')}</td>"
                f"<td class='{s.status}'>{_e(s.status)}</td>{cells}<td>{_e(notes)}</td></tr>"
            )
    return (
        f"<table><tr><th>stage</th><th>output</th><th>status</th>{head}<th>breaches / notes</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _stage_section(report: ParityReport, s: StageResult) -> str:
    parts = [
        f"<h2 id='{_e(s.name)}'>{_e(s.name)} <span class='{s.status}'>{_e(s.status)}</span></h2>"
    ]
    if s.reason:
        parts.append(f"<p>{_e(s.reason)}</p>")
    for out, ref in report.reference.items():
        got = s.scores.get(out)
        if got is None or got.shape != ref.shape:
            continue
        parts.append(
            f"<div class='plots'><img class='plot' alt='{_e(s.name)} {_e(out)} scatter' "
            f"src='data:image/png;base64,{_scatter(ref, got, s.name, out)}'>"
            f"<img class='plot' alt='{_e(s.name)} {_e(out)} errors' "
            f"src='data:image/png;base64,{_histogram(ref, got, s.name, out)}'></div>"
        )
    if s.localisation:
        parts.append("<h3>Localisation</h3>" + _localisation(s.localisation))
    if s.budgets:
        cells = "".join(
            f"<tr><td>{_e(k)}</td><td>{_e(f'{v:g}')}</td></tr>" for k, v in s.budgets.items()
        )
        parts.append(
            f"<h3>Budgets</h3><table><tr><th>metric</th><th>limit</th></tr>{cells}</table>"
        )
        if s.not_evaluated:
            parts.append(
                f"<p>Not evaluated (no data for them): {_e(', '.join(s.not_evaluated))}</p>"
            )
    if s.outputs:
        parts.append(
            f"<details><summary>All metrics</summary><pre>{_e(json.dumps(s.to_dict()['outputs'], indent=1))}</pre></details>"
        )
    return "\n".join(parts)


def _localisation(loc: dict[str, Any]) -> str:
    first = loc.get("first_divergence")
    if not first:
        return f"<p>{_e(loc.get('note', 'no divergence found'))}</p>"
    return (
        f"<p>First tensor beyond tolerance {loc['tolerance']:g} (RMS error / RMS) of "
        f"{loc['compared']} compared: <code>{_e(first['name'])}</code> ({_e(first['op'])}) in module "
        f"<code>{_e(first['module'] or '(root)')}</code> ({_e(first['module_type'])}), graph "
        f"{_e(first['graph'])}, value <code>{_e(first['onnx_value'])}</code>; RMS error / RMS "
        f"{first['rms_rel_error']:.3g}, max abs {first['max_abs']:.3g}"
        + (f" (measured on its view <code>{_e(first['seen_at']['name'])}</code>)"
           if first.get("seen_at") else "")
        + ". Last agreeing tensor: "
        f"<code>{_e(loc.get('last_agreeing'))}</code>.</p><pre>{_e(first['code'])}</pre>"
        + _upstream(loc.get("upstream") or [])
    )


def _upstream(ops: list[dict[str, Any]]) -> str:
    if not ops:
        return ""
    rows = "".join(
        f"<tr><td>{_e(u['op'])}</td><td>{_e(u['node'])}</td><td>{_e(u.get('module') or '')}</td>"
        f"<td>{_e(u.get('pass', ''))}</td><td>{_e(u.get('weight', ''))}</td></tr>"
        for u in ops
    )
    return (
        "<p>ONNX ops between the last agreeing tensors and it (nearest first):</p><table>"
        "<tr><th>op</th><th>node</th><th>module</th><th>made by pass</th><th>weight</th></tr>"
        f"{rows}</table>"
    )


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4.0), dpi=90)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _scatter(ref: np.ndarray, got: np.ndarray, stage: str, out: str) -> str:
    x, y = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    if x.size > MAX_POINTS:
        keep = np.linspace(0, x.size - 1, MAX_POINTS).astype(int)
        x, y = x[keep], y[keep]
    fig, ax = _figure()
    ax.scatter(x, y, s=4, alpha=0.5, color="#1f77b4")
    finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], color="#d62728", linewidth=1, label="y = x")
    ax.set_xlabel(f"eager fp32 {out}")
    ax.set_ylabel(f"{stage} {out}")
    ax.set_title(f"{stage}: score vs reference")
    ax.legend(loc="upper left")
    return _png(fig)


def _histogram(ref: np.ndarray, got: np.ndarray, stage: str, out: str) -> str:
    err = (got.astype(np.float64) - ref.astype(np.float64)).ravel()
    err = err[np.isfinite(err)]
    fig, ax = _figure()
    ax.hist(err if err.size else [0.0], bins=60, color="#1f77b4")
    ax.set_xlabel(f"{stage} − eager ({out})")
    ax.set_ylabel("rows")
    ax.set_title(
        f"{stage}: error distribution (max |e| = {np.abs(err).max() if err.size else 0:.2e})"
    )
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    return _png(fig)
