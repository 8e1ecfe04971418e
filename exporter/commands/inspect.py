"""``ugsep inspect``: a readable summary of a bundle's manifest."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from exporter.commands.inspect_store import print_embeddings
from exporter.progress import console
from runtime.bundle import Bundle
from runtime.ceiling import flop_ceiling
from runtime.manifest import Flops, Optimize, Quantization
from runtime.manifest.tuning import LayerEffect, SpeedTuning, WeightBytes


def ceiling(flops: Flops, n: int) -> float | None:
    """(U+G)/(U/N+G): the speedup bound of the split for a request of N candidates."""
    u, g = flops.user_per_row, flops.group_per_row
    if u is None or g is None:
        return None
    return flop_ceiling(u, g, n)


def inspect_bundle(
    path: str | Path, *, as_json: bool = False, key=None, allow_extra_files: bool = False
) -> int:
    bundle = Bundle.open(path, key=key, allow_extra_files=allow_extra_files)
    m = bundle.manifest
    if as_json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    console.print(
        f"[bold]{m.model_name}[/bold]  precision={m.precision}  format v{m.format_version}  "
        f"ugsep {m.toolchain_version}  created {m.created}"
    )
    src = m.source
    if src.checkpoint:
        console.print(f"source: {src.checkpoint} (sha256 {str(src.checkpoint_sha256)[:12]}…)")
    t = Table(title="inputs")
    for c in ("name", "side", "dtype", "shape", "vocab"):
        t.add_column(c)
    for i in m.spec.inputs:
        t.add_row(i.name, i.side, i.dtype, str(list(i.shape)), str(i.vocab or ""))
    console.print(t)
    t = Table(title="stages")
    for c in ("stage", "file", "size", "inputs", "outputs"):
        t.add_column(c)
    for name, st in m.stages.items():
        entry = m.files.get(st.file)
        t.add_row(
            name,
            st.file,
            _size(entry.bytes if entry else None),
            ", ".join(st.inputs or []),
            ", ".join(st.outputs or []),
        )
    console.print(t)
    if m.small_group_rows:
        console.print(
            f"group_small runs group calls of at most {m.small_group_rows} candidates "
            "(on CPU backends); group runs the larger ones"
        )
    _print_layout(m.optimize)
    _print_moe(m.optimize)
    _print_stage_threads(m)
    _print_split(m)
    _print_row_scope(m)
    _print_quantization(m)
    print_embeddings(m)
    _print_parity(m)
    _print_signature(bundle, key)
    for e in m.engines:
        console.print(
            f"engine: {e.dir} gpu={e.gpu} sm={e.compute_capability} trt={e.trt_version}"
        )
    return 0


def _print_signature(bundle, key) -> None:
    sig = bundle.root / "manifest.sig"
    if not sig.is_file():
        console.print("signature: none (sign with `ugsep sign BUNDLE --key KEY`)")
        return
    try:
        doc = json.loads(sig.read_text())
    except (OSError, ValueError):
        doc = {}
    state = "verified" if key is not None else "not verified (pass --verify KEY)"
    console.print(f"signature: {doc.get('algorithm')} key {doc.get('key_id')}, {state}")


def _print_split(m) -> None:
    if not m.is_split:
        reason = m.split.report.reason if m.split else None
        console.print(f"split: none{f' ({reason})' if reason else ''} — serving runs full.onnx")
        return
    t = Table(title="boundary tensors (user -> group)")
    for c in ("name", "dtype", "shape", "produced by"):
        t.add_column(c)
    for b in m.split.boundary:
        t.add_row(b.name, b.dtype, str(b.shape), str(b.source or ""))
    console.print(t)
    f = m.flops
    if f.user_per_row is not None:
        ceil = ", ".join(f"N={n}: {ceiling(f, n):.2f}x" for n in (1, 16, 128, 512, 2048))
        console.print(
            f"FLOPs per row: user {f.user_per_row:,}  group {f.group_per_row:,}  "
            f"full {f.full_per_row or 0:,}\nsplit ceiling (U+G)/(U/N+G): {ceil}"
        )
        if not f.user_per_row:
            console.print("the user side does no arithmetic (lookups only): the split saves memory "
                          "traffic, not FLOPs")


def _print_row_scope(m) -> None:
    scope = m.row_scope
    if scope is None:
        console.print("row scope: not recorded (exported before the proof): served as row-wise")
        return
    sides = ", ".join(f"{k} {getattr(scope, k)}" for k in ("user", "group", "full") if getattr(scope, k))
    if not m.request_scoped:
        console.print(f"row scope: {sides} — row-wise: requests are batched together")
        return
    console.print(
        f"row scope: {sides} — [bold]request-scoped[/bold]: each request gets its own group "
        "call (user-side work is still batched)"
    )
    for mix in scope.mixing:
        console.print(f"  mixes rows: {mix.op} {mix.node}: {mix.reason}  {mix.source or ''}")


# int8 payload + fp32 scales of the quantized layers, against their fp32 bytes (issue 4)
BYTES_RATIO_TARGET = 0.27


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def quantized_ratio(wb: WeightBytes) -> float | None:
    """int8 + scales over fp32 bytes, counting only the layers that were quantized."""
    fp32 = wb.quantized_layers_fp32
    return wb.quantized_layers_bytes / fp32 if fp32 else None


def _print_quantization(m) -> None:
    q = m.quantization
    if q is None or (not q.weight_bytes and not q.layers):
        return
    _print_weight_bytes(m.precision, q.weight_bytes)
    _print_w8a8_scheme(q)
    _print_speed_tuning(q.speed_tuning)
    _print_layers(q)


def _print_w8a8_scheme(q) -> None:
    """w8a8 (exporter/steps/quantize/w8a8.py): the scheme each stage got, timed on the export CPU."""
    stages = (q.scheme or {}).get("stages") if isinstance(q.scheme, dict) else None
    if q.precision != "w8a8" or not isinstance(stages, dict):
        return
    parts = [f"{s} {r['scheme']} ({r['layers']} layer(s), {r['kernel'].split(' (')[0]})" for s, r in stages.items()]
    bits = q.scheme.get("weight_bits")
    dot = q.scheme.get("int8_dot", "?")  # "?": a bundle written before it was recorded
    console.print(f"w8a8 per stage: {'; '.join(parts)}; weights int8 ({bits}-bit range; export "
                  f"CPU's int8 dot product: {dot or 'none, u8s8 via vpmaddubsw'})")


def _print_layout(optimize: Optimize | None) -> None:
    """The per-token layout each stage got at export (exporter/steps/optimize.py), and why."""
    layouts = (optimize.per_token_layout if optimize else None) or {}
    if not layouts:
        return
    threads = optimize.serve_threads or "1 and onnxruntime default"
    parts = [
        f"{stage} {r.chosen} (unrolled/batched {r.unrolled_vs_batched:.2f}× at batch {r.batch})"
        for stage, r in layouts.items()
    ]
    console.print(f"per-token layout, timed with {threads} thread(s): " + "; ".join(parts))


def _print_moe(optimize: Optimize | None) -> None:
    """Sparse MoE banks per stage (exporter/steps/moe_form.py): form, why, total vs activated params."""
    forms = (optimize.moe_form if optimize else None) or {}
    if not forms:
        return
    t = Table(title="sparse MoE expert banks (FLOPs per row count the activated experts only)")
    for c in ("stage", "form", "chosen by", "banks", "T x E, top-k", "params total", "activated / row"):
        t.add_column(c)
    for stage, r in forms.items():
        banks = r.banks
        total = sum(b.params["total"] for b in banks)
        active = sum(b.params["activated_per_row"] for b in banks)
        shape = ", ".join(sorted({f"{b.tokens}x{b.experts}, k={b.top_k}" for b in banks}))
        why = r.chosen_by
        if why == "timed":
            vs = ", ".join(f"{f} {v:.2f}x" for f, v in (r.vs_gather or {}).items() if f != "gather")
            why += f" (vs gather at batch {r.batch}: {vs})"
        t.add_row(stage, r.form, why, str(len(banks)), shape, f"{total:,}", f"{active:,}")
    console.print(t)


def _print_stage_threads(m) -> None:
    """Intra-op threads per small-batch stage (exporter/steps/threads.py): timed, and the cap."""
    rec = m.optimize.stage_threads if m.optimize else None
    if rec is None or not rec.stages:
        return
    parts = []
    for stage, r in rec.stages.items():
        timed = ", ".join(f"{k}: {v:.3f} ms" for k, v in r.median_ms.items())
        cap = m.stage_threads(stage)
        runs = f"runs on {cap} thread(s)" if cap else "runs on the serving threads"
        parts.append(f"{stage} {runs} ({timed} at batch {r.batch})")
    console.print(
        f"threads, timed against the serving {rec.serve_threads}: " + "; ".join(parts)
    )
    small = rec.stages.get("group_small")
    if small is not None and small.crossover:
        ratios = ", ".join(f"N={r.candidates} {r.ratio:.2f}×" for r in small.crossover)
        console.print(
            f"group_small on {small.chosen} thread(s) re-timed against group: {ratios} -> "
            + (f"serves up to {small.max_rows} candidates" if small.max_rows else str(small.why))
        )


def _print_speed_tuning(tuning: SpeedTuning | None) -> None:
    """Per stage: each speed configuration timed at export (exporter/timing.py, exporter/steps/quantize/speed.py)."""
    if not tuning:
        return
    t = Table(title=f"speed tuning at export: {tuning.cpu or '?'}, threads {tuning.threads}")
    for c in ("stage", "batch", "configuration", "layers", "median ms", "vs fp32", "chosen"):
        t.add_column(c, justify="left" if c in ("stage", "configuration") else "right")
    for stage, r in tuning.stages.items():
        for c in r.configs:
            t.add_row(stage, str(r.batch), c.config, str(c.layers or 0),
                      f"{c.median_ms:.3f}", f"{c.ratio_vs_fp32:.2f}×",
                      "✓" if c.config == r.chosen else "")
    console.print(t)
    if tuning.fallback:
        console.print(f"[yellow]{tuning.fallback}[/yellow]")
    small = tuning.stages.get("group_small")
    if small:
        console.print(f"group_small: {small.why or ''}")
        for r in small.crossover or []:
            console.print(
                f"  N={r.candidates:>4}: group_small {r.small_ms:.3f} ms vs group "
                f"{r.large_ms:.3f} ms ({r.ratio:.2f}×)"
            )


def _print_weight_bytes(precision: str, weight_bytes: dict[str, WeightBytes]) -> None:
    t = Table(
        title=f"linear-layer weight bytes before/after {precision}, per side "
        "(ratio: int8 + scales over fp32, quantized layers only)"
    )
    cols = (
        "side",
        "layers q/all",
        "before (all)",
        "after (all)",
        "quantized fp32",
        "quantized int8+scales",
        "ratio",
        f"<= {BYTES_RATIO_TARGET}",
    )
    for c in cols:
        t.add_column(c, justify="left" if c == "side" else "right")
    for side, v in weight_bytes.items():
        r = quantized_ratio(v)
        ok = (
            "-"
            if r is None
            else ("[green]yes[/green]" if r <= BYTES_RATIO_TARGET else "[red]no[/red]")
        )
        t.add_row(
            side,
            f"{v.quantized_layers}/{v.layers}",
            _size(v.fp32),
            _size(v.quantized),
            _size(v.quantized_layers_fp32),
            _size(v.quantized_layers_bytes),
            "-" if r is None else f"{r:.4f}",
            ok,
        )
    console.print(t)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _print_layers(q: Quantization) -> None:
    """The manifest's per-layer record: precision chosen and the damage measured alone."""
    layers = q.layers
    if not layers:
        return
    t = Table(
        title="layers: precision and measured effect (that layer alone quantized, vs eager fp32)"
    )
    for c in (
        "layer",
        "stage",
        "weights",
        "precision",
        "max abs",
        "mean abs",
        "ΔAUC",
        "top-10",
        "τ",
    ):
        t.add_column(c, justify="left" if c in ("layer", "stage", "precision") else "right")
    for row in layers:
        e = row.effect or LayerEffect()
        prec = row.precision
        t.add_row(
            row.name,
            row.stage,
            str(row.weights),
            f"[yellow]{prec}[/yellow]" if prec == "fp32" else prec,
            _fmt(e.max_abs, ".2e"),
            _fmt(e.mean_abs, ".2e"),
            _fmt(e.delta_auc, "+.1e"),
            _fmt(e.top10_overlap_mean, ".4f"),
            _fmt(e.kendall_tau_mean, ".4f"),
        )
    console.print(t)
    if not any(r.effect for r in layers):
        console.print("effects: not measured (quantized without held-out rows)")
    for path, o in (q.outcome or {}).items():
        verdict = {
            k: "passed" if getattr(o, k) and getattr(o, k).passed else "missed"
            for k in ("all_quantized", "selected")
        }
        console.print(
            f"selection on {path}: all layers quantized {verdict['all_quantized']} the budget, selected {verdict['selected']} it"
        )
        res = o.auc_resolution
        if res and not res.resolved:
            console.print(
                f"  ΔAUC budget not resolved by {res.calibration_rows} calibration rows: "
                f"decided by {res.criterion}"
            )
    kept = q.kept_float or [r.name for r in layers if r.precision == "fp32"]
    budget = q.budget
    console.print(
        f"kept in float by sensitivity: {', '.join(kept) if kept else 'none'}"
        + (f"  (selection budget {json.dumps(budget)})" if budget else "")
    )


def _print_parity(m) -> None:
    p = m.parity
    if p is None:
        console.print("[yellow]parity: none recorded[/yellow] (run `ugsep check`)")
        return
    status = "[green]passed[/green]" if p.passed else "[red]FAILED[/red]"
    console.print(f"parity: {status} {', '.join(p.failed_stages)}")
    for stage, s in p.summary.items():
        console.print(f"  {stage}: {json.dumps(s)[:200]}")
