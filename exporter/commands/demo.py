"""``ugsep demo``: the main job end to end on the embedded default, with a results table.

    train     a teacher, then each tiny student distilled from it (and a labels-only control)
    export    each student: capture, UG split, full.onnx, parity vs eager on held-out rows;
              the RankMixer student also as w8a16 (weight-only int8)
    score     one held-out request through ``runtime.load`` (the parity guard applies)
    bench     split vs full vs eager latency across N on the RankMixer bundle (short run)

Everything lands in ``out_dir`` (``summary.json`` holds every number printed). Nothing
is downloaded; the data comes from the synthetic CTR generator in ``students.data``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporter.progress import console

KINDS = ("rankmixer", "dcn", "twotower")


def run_demo(
    out_dir: Path,
    seed: int = 0,
    quick: bool = False,
    *,
    train_overrides: dict[str, Any] | None = None,
    parity_rows: int | None = None,
    bench_ns: tuple[int, ...] | None = None,
    budgets: dict[str, Any] | None = None,
) -> int:
    """Run the demo into ``out_dir``; 0 when every bundle passed parity, else 1.

    ``train_overrides`` (students.train.TrainConfig fields), ``parity_rows`` and
    ``bench_ns`` shrink the run (the test of the demo uses them, with ``budgets`` to match
    what a small sample can resolve); the defaults are the demo.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = KINDS[:1] if quick else KINDS
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"seed": seed, "quick": quick, "training": {}, "bundles": {}}

    _section("1/4 train: teacher, distilled students, labels-only controls (synthetic CTR data)")
    teacher_dir = None
    for kind in kinds:
        summary["training"][kind] = _train(
            kind, out_dir / "train" / kind, seed, teacher_dir, train_overrides or {}
        )
        teacher_dir = teacher_dir or out_dir / "train" / kind / "teacher"

    _section("2/4 export: capture, UG split, ONNX, quantize, parity vs eager")
    jobs = [(k, "fp32") for k in kinds] + [("rankmixer", "w8a16")]
    for kind, precision in jobs:
        name = f"{kind}-{precision}"
        summary["bundles"][name] = _export(
            out_dir / "train" / kind, out_dir / "bundles" / name, precision, seed, parity_rows,
            budgets,
        )

    _section("3/4 score: one held-out request through runtime.load")
    summary["request"] = _score_request(out_dir / "bundles" / "rankmixer-fp32", out_dir, seed)

    _section("4/4 bench: split vs full vs eager (ONNX Runtime CPU, 2 threads)")
    summary["bench"] = _bench(out_dir / "bundles" / "rankmixer-fp32", out_dir, quick, bench_ns)

    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
    _print_results(summary)
    console.print(f"\nall numbers: [bold]{out_dir / 'summary.json'}[/bold] "
                  f"({summary['total_seconds']:.0f} s in all)")
    failed = [n for n, b in summary["bundles"].items() if not b["parity_passed"]]
    if failed:
        console.print(f"[red]parity failed[/red] for {', '.join(failed)}")
        return 1
    return 0


# -- steps -------------------------------------------------------------------------------


def _train(kind: str, out: Path, seed: int, teacher_dir: Path | None, overrides) -> dict[str, Any]:
    from students.train import distill

    report = distill(
        kind=kind, size="tiny", out_dir=out, seed=seed, teacher_dir=teacher_dir, **overrides
    )
    keys = ("teacher_auc", "student_auc", "student_labels_only_auc", "recovered_share",
            "bayes_auc", "total_seconds", "total_cpu_seconds", "heldout_rows")
    return {k: report.get(k) for k in keys}


def _export(
    train_dir: Path, bundle: Path, precision: str, seed: int, parity_rows: int | None,
    budgets: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from exporter.commands.inspect import ceiling
    from exporter.data import load_rows
    from exporter.load import load_student
    from exporter.pipeline import ExportOptions, export_bundle
    from runtime.manifest import Manifest

    console.print(f"\n[bold]{bundle.name}[/bold]")
    loaded = load_student(train_dir / "student")
    data = load_rows(train_dir / "heldout.npz", loaded.spec)
    t0 = time.perf_counter()
    ctx = export_bundle(
        loaded,
        bundle,
        ExportOptions(
            precision=precision, data=data, overwrite=True, seed=seed, parity_rows=parity_rows,
            budgets=budgets or None,
        ),
    )
    manifest = Manifest.read(bundle)
    report = ctx.parity_report
    worst = _worst_stage(report)
    return {
        "bundle": str(bundle),
        "precision": precision,
        "split": manifest.is_split,
        "boundary_tensors": len(manifest.split.boundary) if manifest.split else 0,
        "ceiling_n512": _round(ceiling(manifest.flops, 512)),
        "parity_passed": bool(report.passed),
        "parity_rows": report.rows["n"],
        "worst_stage": worst,
        "weight_bytes": {k: v.to_dict() for k, v in manifest.quantization.weight_bytes.items()}
        if manifest.quantization else None,
        "export_seconds": round(time.perf_counter() - t0, 1),
    }


def _score_request(bundle: Path, out_dir: Path, seed: int) -> dict[str, Any]:
    import runtime
    from exporter.data import load_rows
    from exporter.evaluate.stages import eager_outputs
    from exporter.load import load_student

    train_dir = out_dir / "train" / "rankmixer"
    scorer = runtime.load(bundle)
    spec = scorer.spec
    rows = load_rows(train_dir / "heldout.npz", spec)
    rid = rows["request_id"]
    pick = np.flatnonzero(rid == rid[np.random.default_rng(seed).integers(len(rid))])
    user = {s.name: rows[s.name][pick[:1]] for s in spec.inputs if s.side == "user"}
    cands = {s.name: rows[s.name][pick] for s in spec.inputs if s.side != "user"}
    got = scorer.score(user, cands)
    eager = eager_outputs(load_student(train_dir / "student").eager(), spec,
                          {s.name: rows[s.name][pick] for s in spec.inputs})
    out = spec.outputs[0]
    scores, ref = np.asarray(got[out]).reshape(-1), np.asarray(eager[out]).reshape(-1)
    top = np.argsort(-scores)[:5]
    console.print(f"request {int(rid[pick[0]])}: 1 user, {len(pick)} candidates, "
                  f"backend {scorer.backend.name}, "
                  f"split={scorer.split}")
    console.print("  top-5 candidates (row: score / eager): " + ", ".join(
        f"{int(i)}: {scores[i]:.4f}/{ref[i]:.4f}" for i in top))
    return {
        "request_id": int(rid[pick[0]]),
        "candidates": int(len(pick)),
        "max_abs_error_vs_eager": float(np.abs(scores - ref).max()),
        "top5": [int(i) for i in top],
        "clicked_in_top5": int(rows["label"][pick][top].sum()) if "label" in rows else None,
    }


def _bench(bundle: Path, out_dir: Path, quick: bool, ns: tuple[int, ...] | None) -> dict[str, Any]:
    from exporter.commands.bench import run_bench

    ns = ns or ((1, 16, 128, 512) if quick else (1, 16, 128, 512, 2048))
    result = run_bench(
        bundle, ns, 2, repeats=10 if quick else 20, seconds_per_n=2.0 if quick else 5.0,
        out_json=out_dir / "bench.json", out_png=out_dir / "bench.png", eager="auto",
    )
    return result


# -- reading results ---------------------------------------------------------------------


def _worst_stage(report) -> dict[str, Any]:
    """The compiled stage with the largest max abs error on the first output."""
    out = report.outputs[0]
    best: dict[str, Any] = {}
    for st in report.stages:
        h = st.headline(out)
        if h.get("max_abs") is None:
            continue
        if not best or h["max_abs"] > best["max_abs"]:
            best = {"stage": st.name, "output": out, "max_abs": h["max_abs"],
                    "delta_auc": h.get("delta_auc"), "top10": h.get("top10_overlap_mean")}
    return best


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


# -- printing ----------------------------------------------------------------------------


def _section(title: str) -> None:
    console.rule(f"[bold]{title}")


def _f(x: Any, fmt: str = ".4f") -> str:
    return "–" if x is None else format(x, fmt)


def _print_results(summary: dict[str, Any]) -> None:
    from rich.table import Table

    console.rule("[bold]results")
    t = Table(title="distillation (tiny students, held-out AUC)")
    for col in ("student", "teacher", "distilled", "labels only", "recovered share", "Bayes",
                "train s"):
        t.add_column(col, justify="right")
    for kind, r in summary["training"].items():
        t.add_row(kind, _f(r["teacher_auc"]), _f(r["student_auc"]),
                  _f(r["student_labels_only_auc"]), _f(r["recovered_share"], ".2f"),
                  _f(r["bayes_auc"]), _f(r["total_seconds"], ".0f"))
    console.print(t)

    t = Table(title="bundles (parity vs eager fp32 on held-out rows)")
    for col in ("bundle", "split", "rows", "worst stage", "max abs err", "ΔAUC", "top-10",
                "parity"):
        t.add_column(col, justify="right")
    for name, b in summary["bundles"].items():
        w = b["worst_stage"] or {}
        t.add_row(name, "yes" if b["split"] else "no", str(b["parity_rows"]),
                  str(w.get("stage", "–")), _f(w.get("max_abs"), ".2e"),
                  _f(w.get("delta_auc"), "+.1e"), _f(w.get("top10"), ".3f"),
                  "[green]pass[/green]" if b["parity_passed"] else "[red]FAIL[/red]")
    console.print(t)

    rows = summary["bench"]["results"]
    t = Table(title="latency, rankmixer fp32 bundle (median ms; ratios are what to compare)")
    for col in ("N", "eager", "full.onnx", "split", "speedup", "FLOP ceiling"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["n"]), _f(r.get("eager_ms"), ".2f"), _f(r.get("full_ms"), ".2f"),
                  _f(r.get("split_ms"), ".2f"), _f(r.get("speedup"), ".2f") + "×",
                  _f(r.get("ceiling"), ".2f") + "×")
    console.print(t)
    load = summary["bench"].get("load_average", {})
    console.print(f"load average during the bench: {load.get('before', 0):.1f} → "
                  f"{load.get('after', 0):.1f} (a shared machine: read ratios, not ms); "
                  f"eager PyTorch ran with {summary['bench'].get('eager_threads', '?')} "
                  f"thread(s), its faster setting here")
