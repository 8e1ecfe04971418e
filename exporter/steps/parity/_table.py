"""The terminal table of a parity report (rich)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

_STATUS = {
    "passed": "[green]pass[/green]",
    "failed": "[red]FAIL[/red]",
    "error": "[red]ERROR[/red]",
    "skipped": "[dim]skip[/dim]",
}
COLUMNS = [
    ("max abs", "max_abs", "{:.2e}"),
    ("mean abs", "mean_abs", "{:.2e}"),
    ("cosine", "cosine", "{:.6f}"),
    ("ΔAUC", "delta_auc", "{:+.1e}"),
    ("ΔAUC 95% CI", "delta_auc_ci", "[{0[0]:+.1e}, {0[1]:+.1e}]"),
    ("top-10", "top10_overlap_mean", "{:.3f}"),
    ("top-50", "top50_overlap_mean", "{:.3f}"),
    ("τ mean", "kendall_tau_mean", "{:.4f}"),
]


def _fmt(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def parity_table(report) -> Table:
    rows = report.rows
    title = (
        f"parity: {report.model_name} ({report.precision}) vs eager fp32 — "
        f"{rows['n']} rows, {rows['requests']} requests, {rows['source']}"
        f"{', labels' if rows.get('labels') else ''}, seed {report.seed}"
    )
    table = Table(title=title)
    multi = len(report.outputs) > 1
    table.add_column("stage")
    if multi:
        table.add_column("output")
    table.add_column("status")
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("breaches / notes")
    for s in report.stages:
        outputs = list(s.outputs) or [None]
        for out in outputs:
            head = s.headline(out) if out else {}
            notes = "; ".join(s.breaches.get(out, [])) if out else (s.reason or "")
            notes = _join(notes, auc_note(s, out))
            if s.localisation and out == outputs[0]:
                notes = (notes + "; " if notes else "") + _where(s.localisation)
            cells = [s.name] + ([out or "–"] if multi else []) + [_STATUS.get(s.status, s.status)]
            cells += [_fmt(head.get(key), fmt) for _, key, fmt in COLUMNS]
            table.add_row(*cells, notes)
    return table


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a and b else a or b


def auc_note(stage, out: str | None) -> str:
    """A passing ΔAUC the rows could not resolve says what decided it instead."""
    v = (stage.outputs.get(out) or {}).get("auc_verdict") if out else None
    if not v or v["mode"] != "unresolved" or not v["passed"]:
        return ""
    return f"ΔAUC not resolved by these rows; {v['text'].split(': ', 1)[-1]}"


def _where(loc: dict[str, Any]) -> str:
    first = loc.get("first_divergence")
    if not first:
        return loc.get("note", "")
    text = f"first diverges at {first['name']} ({first.get('module') or 'root module'})"
    rewritten = [u for u in loc.get("upstream", []) if u.get("weight") or u.get("pass")]
    if rewritten:  # a pass-made op just upstream (e.g. a quantized MatMul) is the likely origin
        u = rewritten[0]
        text += f" after {u['op']}[{u.get('weight') or u.get('pass')}]"
    return text
