"""Export step ``embeddings``: large tables leave the graphs for the bundle's store.

    step_embeddings(ctx)   after capture: FindEmbeddingsPass -> which tables leave (every
                           lookup of the table has ids the runtime can compute, and the
                           table holds at least ``store_min_bytes``) -> CutEmbeddingsPass.
                           ctx.program becomes the cut program (stages take the looked-up
                           rows as inputs), ctx.stage_spec its inputs' spec, and the store
                           file plus the manifest's ``embeddings`` section are queued.

The store is one safetensors file, ``embeddings.safetensors``, written streaming (a table
is never copied whole: fp32 rows are written from the parameter's memory, fp16 and int8
rows are converted ``CHUNK_ROWS`` at a time). ``--embeddings``: fp32 (default, exact),
fp16, or int8 (row-wise, runtime/embstore.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporter.args import StepOptions, arg
from exporter.errors import ExportError
from exporter.progress import console
from runtime.manifest import Embeddings
from runtime.manifest.sections import InGraphTable, StoreLookup, StoreTable
from runtime.spec import FeatureSpec, InputSpec

if TYPE_CHECKING:  # torch and the FX passes load when the step runs: `ugsep export --help` needs neither
    import torch

    from exporter.pipeline import ExportContext
    from graph_passes.fx.embeddings import Lookup

log = logging.getLogger(__name__)
STORE_FILE = "embeddings.safetensors"
DEFAULT_MIN_BYTES = 1 << 20  # tables under 1 MiB stay in the graph
EMBEDDING_DTYPES = ("fp32", "fp16", "int8")
TABLE_DTYPE = {"fp32": "float32", "fp16": "float16", "int8": "int8_rowwise"}
CHUNK_ROWS = 1 << 18


def choose_tables(lookups: list[Lookup], min_bytes: int) -> tuple[set[str], list[dict[str, Any]]]:
    """(tables that leave the graph, [{name, rows, dim, bytes, reason}] of those that stay)."""
    by_table: dict[str, list[Lookup]] = {}
    for lk in lookups:
        by_table.setdefault(lk.table, []).append(lk)
    out, stay = set(), []
    for name, lks in by_table.items():
        t = lks[0]
        refused = next((lk for lk in lks if lk.reason), None)
        if refused is not None:
            reason = f"lookup {refused.node}: {refused.reason}"
        elif t.table_bytes < min_bytes:
            reason = f"{t.table_bytes} bytes, under the store threshold of {min_bytes}"
        else:
            out.add(name)
            continue
        stay.append({"name": name, "rows": t.rows, "dim": t.dim, "bytes": t.table_bytes, "reason": reason})
    return out, stay


def stage_spec(spec: FeatureSpec, stage_inputs: list[tuple[str, Lookup]]) -> FeatureSpec:
    """The spec of the cut program's inputs: the spec's own + one float input per lookup."""
    extra = tuple(
        InputSpec(name=name, side=lk.side, dtype="float32", shape=(*lk.ids_shape, lk.dim))
        for name, lk in stage_inputs
    )
    return FeatureSpec(name=spec.name, inputs=(*spec.inputs, *extra), outputs=spec.outputs, extra=spec.extra)


@dataclass
class EmbeddingsOptions(StepOptions):
    """Step ``embeddings``: which tables leave the graphs for the store, and its dtype."""

    dtype: str = arg("--embeddings", default="fp32", choices=list(EMBEDDING_DTYPES),
                     help="embedding tables in the bundle's store: fp32 (exact), fp16, or int8 "
                     "(row-wise scale and bias); see docs/embedding-store.md")
    min_bytes: int = arg("--store-min-bytes", type=int, default=DEFAULT_MIN_BYTES, metavar="BYTES",
                         help="tables of at least BYTES leave the graphs for the store (default 1 MiB; "
                         "a huge value keeps every table in the graphs)")


def step_embeddings(ctx: ExportContext) -> None:
    """Pipeline step: cut the store's tables out of ``ctx.program`` (see module doc)."""
    from graph_passes.fx._base import fqn_of, state_of
    from graph_passes.fx.embeddings import CutEmbeddingsPass, FindEmbeddingsPass

    o = ctx.options.embeddings
    dtype = o.dtype
    if dtype not in EMBEDDING_DTYPES:
        raise ExportError(f"--embeddings '{dtype}' is not one of {', '.join(EMBEDDING_DTYPES)}")
    min_bytes = int(o.min_bytes)
    lookups = FindEmbeddingsPass(ctx.spec).call(ctx.program).facts["lookups"]
    tables, stay = choose_tables(lookups, min_bytes)
    if not tables:
        if lookups:
            console.print(f"embeddings: {len(stay)} table(s) stay in the graphs (none leaves)")
        return
    by_name = {fqn_of(ctx.program)[ph]: t for ph, t in state_of(ctx.program).items()}
    weights = {t: by_name[t] for t in tables}  # parameters, buffers or lifted constants
    result = CutEmbeddingsPass(ctx.spec, tables).call(ctx.program)
    inputs = result.facts["stage_inputs"]
    ctx.captured = ctx.program
    ctx.program = result.graph_module
    ctx.input_names = [*ctx.input_names, *(n for n, _ in inputs)]
    ctx.stage_spec = stage_spec(ctx.spec, inputs)
    section = store_section(weights, inputs, stay, dtype, min_bytes)
    ctx.manifest_fields["embeddings"] = section
    ctx.extra_files[STORE_FILE] = lambda path: write_store(path, weights, section)
    ctx.store_rows = lambda rows: lookup_rows(weights, section, rows, ctx.spec)
    total = sum(w.numel() * w.element_size() for w in weights.values())
    console.print(
        f"embeddings: {len(tables)} table(s), {total / 2**20:.1f} MiB -> store ({dtype}); "
        f"{len(inputs)} lookup(s) cut, {len(stay)} table(s) stay in the graphs"
    )


def store_section(weights, inputs, stay, dtype: str, min_bytes: int) -> Embeddings:
    """The manifest's ``embeddings`` section (table sha256 and bytes filled in by write_store)."""
    tables = []
    for name, w in weights.items():
        tensors = {"weight": name} if dtype != "int8" else {"qweight": f"{name}.qweight", "scale_bias": f"{name}.scale_bias"}
        tables.append(StoreTable(
            name=name, rows=int(w.shape[0]), dim=int(w.shape[1]),
            dtype=TABLE_DTYPE[dtype], source_dtype=str(w.dtype).replace("torch.", ""),
            file=STORE_FILE, tensors=tensors, sha256=None, bytes=None,
        ))
    lookups = [
        StoreLookup(
            stage_input=name, table=lk.table, input=lk.input, side=lk.side,
            op=lk.op if lk.mode is None else f"{lk.op}({lk.mode})", offsets=lk.offsets,
            shape=[*lk.ids_shape, lk.dim], node=lk.node, module=lk.module,
        )
        for name, lk in inputs
    ]
    return Embeddings(
        format="safetensors", file=STORE_FILE, dtype=dtype, min_table_bytes=min_bytes,
        tables=tables, lookups=lookups, in_graph=[InGraphTable.from_dict(s, "embeddings step", "in_graph") for s in stay],
    )


def _parts(w: torch.Tensor, dtype: str):
    """[(suffix, st dtype, shape, chunk iterator)] of one table in the store's dtype."""
    rows, dim = w.shape
    src = w.detach()

    def chunks(fn):
        for i in range(0, rows, CHUNK_ROWS):
            yield fn(src[i : i + CHUNK_ROWS].float().numpy())

    if dtype == "fp32":
        return [("", "F32", [rows, dim], chunks(lambda a: a))]
    if dtype == "fp16":
        return [("", "F16", [rows, dim], chunks(lambda a: a.astype(np.float16)))]
    return [
        (".qweight", "U8", [rows, dim], chunks(lambda a: rowwise_int8(a)[0])),
        (".scale_bias", "F32", [rows, 2], chunks(lambda a: rowwise_int8(a)[1])),
    ]


def rowwise_int8(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FBGEMM Fused8BitRowwise: (uint8 codes [R, D], float32 [R, 2] scale and bias)."""
    lo, hi = a.min(axis=1), a.max(axis=1)
    scale = ((hi - lo) / 255.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint((a - lo[:, None]) / safe[:, None]), 0, 255).astype(np.uint8)
    return q, np.stack([scale, lo.astype(np.float32)], axis=1)


def write_store(path: Path, weights: dict[str, torch.Tensor], section: Embeddings) -> None:
    """Stream every table into one safetensors file; fills each table's sha256 and bytes."""
    dtype = section.dtype
    plan, offset = [], 0
    for name, w in weights.items():
        for suffix, st, shape, it in _parts(w, dtype):
            size = int(np.prod(shape)) * {"F32": 4, "F16": 2, "U8": 1}[st]
            plan.append((name, name + suffix, st, shape, it, offset, size))
            offset += size
    header = {key: {"dtype": st, "shape": shape, "data_offsets": [off, off + size]}
              for _n, key, st, shape, _it, off, size in plan}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tables = {t.name: t for t in section.tables}
    hashes = {name: hashlib.sha256() for name in tables}  # a table's parts, in file order
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, _key, _st, _shape, it, _off, size in plan:
            written = 0
            for chunk in it:
                buf = memoryview(np.ascontiguousarray(chunk)).cast("B")
                f.write(buf)
                hashes[name].update(buf)
                written += len(buf)
            if written != size:
                raise ExportError(f"store table '{name}': wrote {written} bytes, expected {size}")
            tables[name].bytes = (tables[name].bytes or 0) + size
    for name, h in hashes.items():
        tables[name].sha256 = h.hexdigest()


def lookup_rows(weights, section: Embeddings, rows: dict[str, np.ndarray], spec) -> dict[str, np.ndarray]:
    """``rows`` + each lookup's gathered vectors, as the runtime computes them (fp32 tables)
    or dequantised like the store (fp16/int8): the cut stages' inputs, e.g. for calibration."""
    import torch

    out = dict(rows)
    for lk in section.lookups:
        ids = np.asarray(rows[lk.input], dtype=np.int64)
        if lk.offsets is not None:
            ids = ids + np.asarray(lk.offsets, np.int64).reshape(spec.input(lk.input).shape)
        w = weights[lk.table].detach()[torch.from_numpy(ids.reshape(-1))].float().numpy()
        if section.dtype == "fp16":
            w = w.astype(np.float16).astype(np.float32)
        elif section.dtype == "int8":
            q, sb = rowwise_int8(w)
            w = q * sb[:, :1] + sb[:, 1:2]
        out[lk.stage_input] = w.reshape(*ids.shape, -1).astype(np.float32)
    return out
