"""``ugsep inspect``: the embedding store section (tables, bytes per table, lookups per side)."""

from __future__ import annotations

from rich.table import Table

from exporter.progress import console


def print_embeddings(m) -> None:
    """Tables in the store with their bytes (and fp32 bytes), the lookups, tables in-graph."""
    sec = m.embeddings
    if not sec:
        return
    uses: dict[str, list[str]] = {}
    for lk in sec.lookups:
        uses.setdefault(lk.table, []).append(f"{lk.input} ({lk.side}, {lk.op})")
    t = Table(title=f"embedding store: {sec.file} ({sec.dtype}, memory-mapped)")
    for c in ("table", "rows", "dim", "dtype", "bytes", "bytes / fp32", "looked up by"):
        t.add_column(c)
    for tab in sec.tables:
        fp32 = tab.rows * tab.dim * 4
        t.add_row(tab.name, str(tab.rows), str(tab.dim), tab.dtype, _mib(tab.bytes),
                  f"{tab.bytes / fp32:.3f}" if tab.bytes else "–", "; ".join(uses.get(tab.name, [])))
    console.print(t)
    total = sum(tab.bytes or 0 for tab in sec.tables)
    console.print(f"store: {len(sec.tables)} table(s), {_mib(total)}; user-side ids are looked up "
                  "once per request, candidate ids once per candidate")
    for s in sec.in_graph:
        console.print(f"in graph: {s.name} [{s.rows} x {s.dim}], {_mib(s.bytes)}: {s.reason}")


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.2f} MiB"
