"""The embedding store: tables outside the compiled graphs, looked up by the runtime.

    store = MmapStore.open(bundle)           # the bundle's safetensors file, memory-mapped
    store.lookup("item_emb.table.weight", ids)   # -> float32 [*ids.shape, dim]
    store.rows(t), store.dim(t), store.dtype(t)

``EmbeddingStore`` is the seam: anything with these four methods serves lookups (a remote
tier such as Redis Cluster with a hot-row cache implements the same Protocol).
``StoreFeeds`` turns a call's validated id inputs into the stage inputs the manifest's
``embeddings.lookups`` name, side by side: user ids once per user row, candidate ids once
per candidate.

Tables are stored fp32, fp16 or row-wise int8 (``int8_rowwise``: uint8 codes with a float32
scale and bias per row, the FBGEMM/TorchRec ``Fused8BitRowwise`` convention:
``x = q * scale + bias``, scale = (max - min) / 255, bias = min). Lookups are vectorised
``np.take`` on the memory map into per-thread preallocated buffers; pages of a table become
resident only when rows on them are read, so resident memory grows with the rows touched.

Resident memory: a store file up to ``map_limit`` (default ``MAP_LIMIT``, 256 MiB) is read
through its memory map with ``np.take``. A larger one is read row by row with ``os.pread``
(the table's pages stay in the page cache, shared by every process, but never enter this
process's RSS): on Linux a fault on a mapped file maps the whole page-cache folio around it
(measured on this kernel: ~2 MiB per random row touched; ``MADV_RANDOM`` /
``MADV_NOHUGEPAGE`` do not stop it), so random lookups into a 3.5 GB table map most of it
within a few thousand requests, and dropping the mappings again (``MADV_DONTNEED``) costs
more per row (unmapping 512 PTEs) than a ``pread`` of the row (~1-4 µs).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from runtime.errors import BundleError, RequestError
from runtime.manifest.sections import Embeddings, StoreLookup, StoreTable

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8}
MAP_LIMIT = 256 << 20  # store files larger than this are read with pread, not through the map
_OPEN: dict[tuple, MmapStore] = {}  # (path, size, mtime, tables) -> the process's one mapping
_OPEN_LOCK = threading.Lock()


@runtime_checkable
class EmbeddingStore(Protocol):
    """What the scorer needs from a store of embedding tables."""

    def lookup(self, table: str, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``ids`` (int64, any shape, already in [0, rows)) -> float32 [*ids.shape, dim]."""

    def rows(self, table: str) -> int: ...

    def dim(self, table: str) -> int: ...

    def dtype(self, table: str) -> str: ...


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, data offset) of a safetensors file; BundleError when it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise BundleError(f"embedding store '{path}' is truncated (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise BundleError(f"embedding store '{path}' is not a safetensors file")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise BundleError(f"embedding store file '{path}' is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"embedding store '{path}' has an unreadable header: {e}") from e
    return header, 8 + n


class MmapStore:
    """Tables in one safetensors file of the bundle, memory-mapped read-only; a file larger
    than ``map_limit`` (None: no limit) is read with ``pread`` (``self.pread``)."""

    def __init__(
        self, path: str | Path, tables: list[StoreTable], map_limit: int | None = MAP_LIMIT
    ) -> None:
        self.path = Path(path)
        header, base = read_safetensors_header(self.path)
        size = self.path.stat().st_size
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size > base else None
        self.pread = map_limit is not None and size > map_limit
        self._fd = os.open(self.path, os.O_RDONLY) if self.pread else None
        self._offsets: dict[tuple[str, str], int] = {}  # (table, part) -> file offset of row 0
        self._meta = {t.name: t for t in tables}
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        for t in tables:
            self._arrays[t.name] = {
                part: self._view(header, base, size, key, t.name) for part, key in t.tensors.items()
            }
            for part, key in t.tensors.items():
                self._offsets[(t.name, part)] = base + int(header[key]["data_offsets"][0])
            self._check_rows(t)

    @classmethod
    def open(cls, bundle) -> MmapStore:
        """The store of a loaded ``runtime.bundle.Bundle`` (its manifest's ``embeddings``).

        One mapping per file and process: every scorer of the bundle (split, full, parity's
        configurations, a reloaded model) shares it, so a touched page is resident once."""
        return cls.open_path(bundle.path(bundle.manifest.embeddings.file), bundle.manifest.embeddings)

    @classmethod
    def open_path(cls, path: str | Path, sec: Embeddings) -> MmapStore:
        """The store file ``path`` described by a manifest's ``embeddings`` section ``sec``
        (the process's one mapping of it, as ``open``)."""
        path = Path(path).resolve()
        try:
            st = path.stat()
        except FileNotFoundError as e:
            raise BundleError(f"embedding store file '{path}' is missing") from e
        key = (str(path), st.st_size, st.st_mtime_ns, json.dumps([t.to_dict() for t in sec.tables], sort_keys=True))
        with _OPEN_LOCK:
            store = _OPEN.get(key)
            if store is None:
                store = _OPEN[key] = cls(path, sec.tables)
        return store

    def _view(self, header, base: int, size: int, key: str, table: str) -> np.ndarray:
        info = header.get(key)
        if info is None:
            raise BundleError(f"embedding store '{self.path}' has no tensor '{key}' (table '{table}')")
        start, end = (int(x) for x in info["data_offsets"])
        if base + end > size or self._mm is None:
            raise BundleError(
                f"embedding store '{self.path}' is truncated: table '{table}' needs bytes up to "
                f"{base + end}, the file has {size}; re-export the bundle"
            )
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        shape = tuple(int(d) for d in info["shape"])
        return np.ndarray(shape, dtype=dtype, buffer=self._mm, offset=base + start)

    def _check_rows(self, t: StoreTable) -> None:
        arrs = self._arrays[t.name]
        main = arrs.get("weight", arrs.get("qweight"))
        if main is None or main.shape != (t.rows, t.dim):
            got = None if main is None else list(main.shape)
            raise BundleError(
                f"embedding store '{self.path}': table '{t.name}' has shape {got}, the manifest "
                f"says [{t.rows}, {t.dim}]"
            )

    def rows(self, table: str) -> int:
        return self._meta[table].rows

    def dim(self, table: str) -> int:
        return self._meta[table].dim

    def dtype(self, table: str) -> str:
        return self._meta[table].dtype

    def nbytes(self, table: str) -> int:
        return int(sum(a.nbytes for a in self._arrays[table].values()))

    def lookup(self, table: str, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        arrs = self._arrays[table]
        flat = ids.reshape(-1)
        shape = (*ids.shape, self.dim(table))
        if out is None:
            out = np.empty((flat.size, self.dim(table)), dtype=np.float32)
        if "weight" in arrs:
            if arrs["weight"].dtype == np.float32:
                self._rows(table, "weight", flat, out=out)
            else:
                out[...] = self._rows(table, "weight", flat)
            return out.reshape(shape)
        q = self._rows(table, "qweight", flat)
        sb = self._rows(table, "scale_bias", flat)
        np.multiply(q, sb[:, :1], out=out)
        out += sb[:, 1:2]
        return out.reshape(shape)

    def _rows(self, table: str, part: str, flat: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``flat`` of one tensor of ``table`` in its stored dtype: ``np.take`` on the
        map, or one ``pread`` per row (``self.pread``; see the module doc)."""
        a = self._arrays[table][part]
        if self._fd is None:
            return np.take(a, flat, axis=0, out=out)
        rb, base, fd, pread = a.strides[0], self._offsets[(table, part)], self._fd, os.pread
        data = b"".join([pread(fd, rb, base + r * rb) for r in flat.tolist()])
        if len(data) != rb * flat.size:
            raise BundleError(f"embedding store '{self.path}': short read of table '{table}' (truncated?)")
        got = np.frombuffer(data, dtype=a.dtype).reshape(flat.size, *a.shape[1:])
        if out is None:
            return got
        out[...] = got
        return out

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class StoreFeeds:
    """The stage inputs of a bundle's store lookups, per side, from validated id inputs."""

    def __init__(self, store: EmbeddingStore, section: Embeddings, spec) -> None:
        self.store = store
        self.lookups = list(section.lookups)
        self._local = threading.local()
        self._offsets = {  # per lookup: the table offset of each id column, shaped like the ids
            lk.stage_input: None if lk.offsets is None else np.asarray(lk.offsets, np.int64).reshape(
                [int(d) for d in spec.input(lk.input).shape]
            )
            for lk in self.lookups
        }
        for lk in self.lookups:
            _check_vocab(store, lk, spec)

    @classmethod
    def for_directory(cls, root: str | Path, manifest) -> StoreFeeds | None:
        """The lookups of ``manifest`` from its store file copied into ``root`` (a Triton
        orchestrator's copy of the bundle's manifest and store), checked against the
        manifest's sha256 first."""
        sec = manifest.embeddings
        if not sec or not sec.lookups:
            return None
        from runtime.bundle import sha256_file

        path = Path(root) / sec.file
        if not path.is_file():
            raise BundleError(f"embedding store file '{path}' is missing")
        entry = manifest.files.get(sec.file)
        want = entry.sha256 if entry else None
        if sha256_file(path) != want:
            raise BundleError(f"embedding store '{path}' does not match its manifest sha256; copy the bundle again")
        return cls(MmapStore.open_path(path, sec), sec, manifest.spec)

    @classmethod
    def for_bundle(cls, bundle, store: EmbeddingStore | None = None) -> StoreFeeds | None:
        """The bundle's lookups from its own store, or from ``store`` (a remote tier)."""
        sec = bundle.manifest.embeddings
        if not sec or not sec.lookups:
            return None
        return cls(store or MmapStore.open(bundle), sec, bundle.manifest.spec)

    def feeds(self, inputs: dict[str, np.ndarray], side: str) -> dict[str, np.ndarray]:
        """``inputs`` + the gathered rows of every lookup on ``side`` ("user", "group" or
        "both") whose id input is present."""
        out = dict(inputs)
        todo = [(lk, self._rows(lk, inputs[lk.input])) for lk in self.lookups
                if (side == "both" or lk.side == side) and lk.input in inputs]
        many = getattr(self.store, "lookup_many", None)
        if many is not None and len(todo) > 1:  # a remote tier: every lookup in one round trip
            got = many([(lk.table, ids) for lk, ids in todo])
            return {**out, **{lk.stage_input: v for (lk, _), v in zip(todo, got, strict=True)}}
        for lk, ids in todo:
            buf = self._buffer(lk.stage_input, ids.size, self.store.dim(lk.table))
            out[lk.stage_input] = self.store.lookup(lk.table, ids, out=buf)
        return out

    def check(self, inputs: dict[str, np.ndarray], side: str) -> None:
        """RequestError naming the input and the id when an id of ``side`` is outside its table."""
        for lk in self.lookups:
            if lk.side == side and lk.input in inputs:
                self._rows(lk, inputs[lk.input])

    def _rows(self, lk: StoreLookup, ids: np.ndarray) -> np.ndarray:
        rows = ids.astype(np.int64, copy=False)
        offsets = self._offsets[lk.stage_input]
        if offsets is not None:
            rows = rows + offsets
        n = self.store.rows(lk.table)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            pos = np.flatnonzero((rows.reshape(-1) < 0) | (rows.reshape(-1) >= n))[0]
            bad = int(ids.reshape(-1)[pos])
            raise RequestError(
                f"input '{lk.input}' has id {bad} outside embedding table '{lk.table}' "
                f"({n} rows)"
            )
        return rows

    def _buffer(self, key: str, n: int, dim: int) -> np.ndarray:
        """A float32 [n, dim] buffer of this thread, reused across calls (grown on demand)."""
        bufs = self._local.__dict__.setdefault("bufs", {})
        buf = bufs.get(key)
        if buf is None or buf.shape[0] < n:
            buf = bufs[key] = np.empty((max(n, 64), dim), dtype=np.float32)
        return buf[:n]


def _check_vocab(store: EmbeddingStore, lk: StoreLookup, spec) -> None:
    """A store whose rows cannot hold the spec's vocabulary (plus offsets) is refused."""
    vocab = spec.input(lk.input).vocab
    if vocab is None:
        return
    top = (max(lk.offsets) if lk.offsets else 0) + vocab
    rows = store.rows(lk.table)
    if top > rows:
        raise BundleError(
            f"embedding table '{lk.table}' has {rows} rows but input '{lk.input}' "
            f"(vocab {vocab}) needs {top}; the store does not match the spec"
        )


def budget_precision(manifest) -> str:
    """The parity budget of a bundle's stages: int8 tables are judged like W8A16 (ranking
    metrics), fp16 tables like fp16, unless the dense precision is already coarser."""
    dtype = manifest.store_dtype
    if manifest.precision != "fp32" or dtype == "fp32":
        return manifest.precision
    return {"int8": "w8a16", "fp16": "fp16"}[dtype]


def store_suffix(manifest) -> str:
    """'-emb-int8' / '-emb-fp16' for stage names of a bundle with a quantized store."""
    dtype = manifest.store_dtype
    return "" if dtype == "fp32" else f"-emb-{dtype}"
