"""The seam between a bundle's embedding store (runtime/embstore.py) and the Redis tier.

* ``bundle_tables(bundle)`` reads the bundle's memory-mapped safetensors store as push
  sources (raw rows in the stored dtype, int8 rows with their scale and bias);
* ``store_version(bundle)`` is the store file's sha256 from the manifest: the version a
  push writes and a server pins;
* ``RedisStore`` implements the ``EmbeddingStore`` protocol over a ``RedisTier``, so the
  scorer's ``StoreFeeds`` look rows up in the cluster exactly as in the local store
  (same dequantisation: the scores equal the local-store bundle's).
"""

from __future__ import annotations

import numpy as np

from runtime.embstore import read_safetensors_header
from runtime.errors import BundleError
from runtime.redis_tier.connection import TierConfig
from runtime.redis_tier.layout import TableLayout
from runtime.redis_tier.tier import RedisTier

_TIER_DTYPE = {"float32": "float32", "float16": "float16", "int8_rowwise": "int8"}
_STORE_DTYPE = {v: k for k, v in _TIER_DTYPE.items()}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8}


def _section(bundle):
    sec = bundle.manifest.embeddings
    if not sec or not sec.tables:
        raise BundleError(
            f"bundle '{bundle.root}' has no embedding store (its tables are in the graphs); "
            "export it with the store to use a Redis tier"
        )
    return sec


def store_version(bundle) -> str:
    """The store file's sha256 (from the manifest, verified when the bundle was opened)."""
    sec = _section(bundle)
    entry = bundle.manifest.files.get(sec.file)
    if not entry or not entry.sha256:
        raise BundleError(f"bundle '{bundle.root}': the store file '{sec.file}' has no sha256 in the manifest")
    return str(entry.sha256)


def bundle_layouts(bundle) -> dict[str, TableLayout]:
    """The tier layouts (no buckets yet) of the bundle's store tables."""
    return {
        t.name: TableLayout(t.name, t.rows, t.dim, _TIER_DTYPE[t.dtype])
        for t in _section(bundle).tables
    }


class StoreTable:
    """One table of a bundle's safetensors store as a push source (memory-mapped)."""

    def __init__(self, layout: TableLayout, parts: dict[str, np.ndarray]) -> None:
        self.layout = layout
        self._parts = parts

    def raw_rows(self, start: int, stop: int) -> np.ndarray:
        n = stop - start
        if "weight" in self._parts:
            return np.ascontiguousarray(self._parts["weight"][start:stop]).view(np.uint8).reshape(n, -1)
        q = self._parts["qweight"][start:stop]
        sb = np.ascontiguousarray(self._parts["scale_bias"][start:stop], dtype=np.float32)
        return np.concatenate([q, sb.view(np.uint8).reshape(n, 8)], 1)


def bundle_tables(bundle) -> list[StoreTable]:
    """Every store table of ``bundle`` as a push source, read through one memory map."""
    sec = _section(bundle)
    path = bundle.path(sec.file)
    header, base = read_safetensors_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    layouts = bundle_layouts(bundle)
    out = []
    for t in sec.tables:
        parts = {}
        for part, key in t.tensors.items():
            info = header[key]
            start, _ = info["data_offsets"]
            parts[part] = np.ndarray(tuple(info["shape"]), dtype=_ST_DTYPES[info["dtype"]], buffer=mm,
                                     offset=base + int(start))
        out.append(StoreTable(layouts[t.name], parts))
    return out


class RedisStore:
    """``EmbeddingStore`` over a RedisTier pinned to the bundle's store version."""

    def __init__(self, tier: RedisTier) -> None:
        self.tier = tier

    @classmethod
    def for_bundle(cls, bundle, config: TierConfig | str, cache_bytes: int = 0) -> RedisStore:
        """Pin the bundle's store version; refuses until the tier holds it complete."""
        tier = RedisTier.open(config, store_version(bundle), expected=bundle_layouts(bundle),
                              cache_bytes=cache_bytes)
        return cls(tier)

    def lookup(self, table: str, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        vec = self.tier.lookup(table, ids)
        if out is None:
            return vec
        out.reshape(vec.shape)[...] = vec
        return out.reshape(vec.shape)

    def lookup_many(self, requests: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        """Several lookups (tables may repeat) in one tier call: one round trip per node."""
        by_table: dict[str, list[np.ndarray]] = {}
        for table, ids in requests:
            by_table.setdefault(table, []).append(np.asarray(ids).reshape(-1))
        got = self.tier.lookup_many({t: np.concatenate(parts) for t, parts in by_table.items()})
        offsets = dict.fromkeys(by_table, 0)
        out = []
        for table, ids in requests:
            start = offsets[table]
            offsets[table] += ids.size
            out.append(got[table][start : start + ids.size].reshape(*np.shape(ids), self.dim(table)))
        return out

    def rows(self, table: str) -> int:
        return self.tier.layouts[table].rows

    def dim(self, table: str) -> int:
        return self.tier.layouts[table].dim

    def dtype(self, table: str) -> str:
        return _STORE_DTYPE[self.tier.layouts[table].dtype]
