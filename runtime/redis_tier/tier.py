"""Row lookups from a pinned version in Redis Cluster, behind the hot-row cache.

    tier = RedisTier.open("redis://10.0.0.5:7000", version, cache_bytes=256 << 20)
    vectors = tier.lookup("item_ids", ids)          # float32 [*ids.shape, dim]

A lookup takes the distinct ids of every table in the call, serves what the hot cache
holds, and fetches the rest in ONE cluster pipeline: one HMGET per (table, bucket),
which redis-py groups into one round trip per node (written to every node before any
reply is read). A row the tier cannot deliver — node down, timeout, data missing —
fails the whole lookup with TierUnavailableError naming the tier; a row is never
replaced by zeros.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from runtime.errors import BundleError, RequestError, TierUnavailableError
from runtime.redis_tier.connection import TierConfig, connect, tier_errors
from runtime.redis_tier.hotcache import HotRowCache
from runtime.redis_tier.layout import (
    TableLayout,
    bucket_key,
    check_name,
    decode_meta,
    decode_rows,
    done_key,
    meta_key,
)

# One bucket's rows in one call, one reply: ARGV[1] = the ids (space-separated decimal, the
# hash's field names), ARGV[2] = bytes per row. Returns the rows concatenated in order, or an
# error naming the first missing row: the client parses one blob instead of one reply per row.
READ_ROWS_LUA = """#!lua flags=no-writes
local fields = {}
for f in string.gmatch(ARGV[1], "%d+") do fields[#fields + 1] = f end
local out = {}
for i = 1, #fields, 4000 do
  local vals = redis.call("HMGET", KEYS[1], unpack(fields, i, math.min(i + 3999, #fields)))
  for j = 1, #vals do
    if not vals[j] or #vals[j] ~= tonumber(ARGV[2]) then
      return redis.error_reply("ugsep: missing row " .. fields[i + j - 1] .. " in " .. KEYS[1])
    end
    out[#out + 1] = vals[j]
  end
end
return table.concat(out)
"""


@dataclass
class TierStats:
    """Remote traffic since the tier was opened."""

    fetches: int = 0          # lookups that went to the cluster (one pipeline each)
    rows_fetched: int = 0     # distinct rows read from the cluster
    failures: int = 0         # lookups that raised TierUnavailableError


class RedisTier:
    """Lookups of one complete pushed version; thread-safe."""

    def __init__(self, config: TierConfig, version: str, layouts: Mapping[str, TableLayout],
                 client, cache_bytes: int = 0) -> None:
        self.config = config
        self.version = version
        self.layouts = dict(layouts)
        self.cache = HotRowCache(cache_bytes, self.layouts)
        self._client = client
        self._stats = TierStats()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, config: TierConfig | str, version: str, *, expected: Mapping[str, TableLayout] | None = None,
             cache_bytes: int = 0, client=None) -> RedisTier:
        """Connect and pin ``version``; refuses (TierUnavailableError) unless its push completed,
        and (BundleError) if its tables differ from ``expected``."""
        config = TierConfig(config) if isinstance(config, str) else config
        check_name("version", version)
        client = client or connect(config)
        layouts = read_complete_version(client, config, version)
        for name, want in (expected or {}).items():
            got = layouts.get(name)
            if got is None or not got.same_table(want):
                raise BundleError(
                    f"embedding tier {config.name} version {version}: table '{name}' is "
                    f"{_describe(got)} there, the bundle expects {_describe(want)}"
                )
        return cls(config, version, layouts, client, cache_bytes)

    def lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Rows of ``table`` for ``ids`` (any shape) as float32 ``[*ids.shape, dim]``."""
        return self.lookup_many({table: ids})[table]

    def lookup_many(self, requests: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Several tables in one call: one pipeline, one round trip per node, for all misses."""
        raw = self.lookup_raw_many(requests)
        out = {}
        for name, rows in raw.items():
            t = self.layouts[name]
            flat = decode_rows(t, rows.reshape(-1, t.row_nbytes))
            out[name] = flat.reshape(rows.shape[:-1] + (t.dim,))
        return out

    def lookup_raw_many(self, requests: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw stored rows ``uint8 [*ids.shape, row_nbytes]`` per table."""
        plans = {name: self._plan(name, ids) for name, ids in requests.items()}
        misses = {name: p for name, p in plans.items() if p.missing.any()}
        if misses:
            self._fetch(misses)
        return {name: p.rows[p.inverse].reshape(p.shape + (p.layout.row_nbytes,)) for name, p in plans.items()}

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(**vars(self._stats))

    def close(self) -> None:
        self._client.close()

    def _plan(self, name: str, ids: np.ndarray) -> _Plan:
        t = self.layouts.get(name)
        if t is None:
            raise RequestError(f"embedding tier version {self.version} has no table '{name}'")
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise RequestError(f"ids for table '{name}' must be integers, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= t.rows):
            bad = ids[(ids < 0) | (ids >= t.rows)].ravel()[0]
            raise RequestError(f"id {int(bad)} is out of range for table '{name}' ({t.rows} rows)")
        uniq, inverse = np.unique(ids.ravel().astype(np.int64), return_inverse=True)
        rows = np.empty((len(uniq), t.row_nbytes), np.uint8)
        missing = self.cache.get(name, uniq, rows)
        return _Plan(t, ids.shape, uniq, inverse, rows, missing)

    def _fetch(self, plans: Mapping[str, _Plan]) -> None:
        calls = []  # (plan, positions in uniq) per bucket read
        try:
            with tier_errors(self.config, f"reading version {self.version}"):
                pipe = self._client.pipeline()
                for p in plans.values():
                    for positions, bucket in _by_bucket(p):
                        fields = " ".join(map(str, p.uniq[positions].tolist()))
                        pipe.execute_command("EVAL", READ_ROWS_LUA, 1, bucket_key(p.layout, bucket), fields,
                                             p.layout.row_nbytes)
                        calls.append((p, positions))
                replies = pipe.execute(raise_on_error=False)
            for (p, positions), blob in zip(calls, replies, strict=True):
                p.rows[positions] = self._rows_of(p.layout, len(positions), blob)
        except TierUnavailableError:
            with self._lock:
                self._stats.failures += 1
            raise
        with self._lock:
            self._stats.fetches += 1
            self._stats.rows_fetched += sum(int(p.missing.sum()) for p in plans.values())
        for name, p in plans.items():
            self.cache.put(name, p.uniq[p.missing], p.rows[p.missing])

    def _rows_of(self, t: TableLayout, n: int, blob) -> np.ndarray:
        """One bucket's reply -> uint8 [n, row_nbytes]; a missing row or an error raises."""
        if isinstance(blob, Exception):
            if "ugsep: missing row" in str(blob):
                raise TierUnavailableError(
                    f"embedding tier {self.config.name} version {self.version}: table '{t.name}' "
                    f"lost rows ({str(blob).split('ugsep: ')[-1]}); push the version again"
                ) from blob
            with tier_errors(self.config, f"reading version {self.version}"):
                raise blob
        if len(blob) != n * t.row_nbytes:
            raise TierUnavailableError(
                f"embedding tier {self.config.name} version {self.version}: table '{t.name}' returned "
                f"{len(blob)} bytes for {n} rows of {t.row_nbytes}; push the version again"
            )
        return np.frombuffer(blob, np.uint8).reshape(n, t.row_nbytes)


@dataclass
class _Plan:
    layout: TableLayout
    shape: tuple[int, ...]
    uniq: np.ndarray
    inverse: np.ndarray
    rows: np.ndarray
    missing: np.ndarray


def _by_bucket(p: _Plan):
    """(positions into p.uniq, bucket) for the missed ids, one entry per bucket touched."""
    positions = np.flatnonzero(p.missing)
    buckets = p.uniq[positions] % p.layout.buckets
    order = np.argsort(buckets, kind="stable")
    positions, buckets = positions[order], buckets[order]
    cuts = np.flatnonzero(np.diff(buckets)) + 1
    for group in np.split(np.arange(len(positions)), cuts):
        yield positions[group], int(buckets[group[0]])


def read_complete_version(client, config: TierConfig, version: str) -> dict[str, TableLayout]:
    """The layouts of ``version`` if its push completed, else TierUnavailableError saying which."""
    with tier_errors(config, f"checking version {version}"):
        done, meta = client.get(done_key(version)), client.get(meta_key(version))
    if done is None or meta is None:
        state = "an incomplete push of" if meta is not None else "no"
        raise TierUnavailableError(
            f"embedding tier {config.name} holds {state} version {version}: run "
            f"`ugsep embeddings push BUNDLE --redis {config.name}` for the bundle with that store"
        )
    return decode_meta(meta, f"embedding tier {config.name} version {version}")


def _describe(t: TableLayout | None) -> str:
    return "absent" if t is None else f"{t.rows} x {t.dim} {t.dtype}"
