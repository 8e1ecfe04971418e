"""``ugsep inspect``: a readable summary of a bundle's manifest."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from exporter.progress import console
from runtime.bundle import Bundle


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def ceiling(flops: dict, n: int) -> float | None:
    """(U+G)/(U/N+G): the speedup bound of the split for a request of N candidates."""
    u, g = flops.get("user_per_row"), flops.get("group_per_row")
    if not u or not g:
        return None
    return (u + g) / (u / n + g)


def inspect_bundle(path: str | Path, *, as_json: bool = False) -> int:
    bundle = Bundle.open(path)
    m = bundle.manifest
    if as_json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    console.print(
        f"[bold]{m.model_name}[/bold]  precision={m.precision}  format v{m.format_version}  "
        f"ugsep {m.toolchain_version}  created {m.created}"
    )
    src = m.source or {}
    if src.get("checkpoint"):
        console.print(f"source: {src['checkpoint']} (sha256 {str(src.get('checkpoint_sha256'))[:12]}…)")
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
        size = m.files.get(st["file"], {}).get("bytes")
        t.add_row(name, st["file"], _mib(size), ", ".join(st.get("inputs", [])), ", ".join(st.get("outputs", [])))
    console.print(t)
    _print_split(m)
    _print_quantization(m)
    _print_parity(m)
    for e in m.engines:
        console.print(f"engine: {e.get('dir')} gpu={e.get('gpu')} sm={e.get('compute_capability')} trt={e.get('trt_version')}")
    return 0


def _print_split(m) -> None:
    if not m.is_split:
        reason = (m.split or {}).get("report", {}).get("reason") if m.split else None
        console.print(f"split: none{f' ({reason})' if reason else ''} — serving runs full.onnx")
        return
    t = Table(title="boundary tensors (user -> group)")
    for c in ("name", "dtype", "shape", "produced by"):
        t.add_column(c)
    for b in m.split["boundary"]:
        t.add_row(b["name"], b["dtype"], str(b["shape"]), str(b.get("source", "")))
    console.print(t)
    f = m.flops or {}
    if f.get("user_per_row") is not None:
        ceil = ", ".join(f"N={n}: {ceiling(f, n):.2f}x" for n in (1, 16, 128, 512, 2048))
        console.print(
            f"FLOPs per row: user {f['user_per_row']:,}  group {f['group_per_row']:,}  "
            f"full {f.get('full_per_row', 0):,}\nsplit ceiling (U+G)/(U/N+G): {ceil}"
        )


def _print_quantization(m) -> None:
    q = m.quantization or {}
    wb = q.get("weight_bytes")
    if not wb:
        return
    t = Table(title=f"weight bytes ({m.precision})")
    for c in ("graph", "float", "quantized", "ratio"):
        t.add_column(c)
    for side, v in wb.items():
        before, after = v.get("fp32"), v.get("quantized")
        ratio = f"{after / before:.3f}" if before else "-"
        t.add_row(side, _mib(before), _mib(after), ratio)
    console.print(t)
    kept = [layer["name"] for layer in q.get("layers", []) if layer.get("precision") == "fp32"]
    if kept:
        console.print(f"kept in float by sensitivity: {', '.join(kept)}")


def _print_parity(m) -> None:
    p = m.parity
    if p is None:
        console.print("[yellow]parity: none recorded[/yellow] (run `ugsep check`)")
        return
    status = "[green]passed[/green]" if p.get("passed") else "[red]FAILED[/red]"
    console.print(f"parity: {status} {', '.join(p.get('failed_stages', []))}")
    for stage, s in (p.get("summary") or {}).items():
        console.print(f"  {stage}: {json.dumps(s)[:200]}")
