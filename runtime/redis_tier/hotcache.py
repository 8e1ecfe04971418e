"""The in-process hot-row cache in front of the tier: raw rows, bounded in bytes, LRU.

Each table gets a share of the byte budget proportional to its size (so "1 % hot
cache" means 1 % of every table's rows) and keeps its rows in one preallocated
``uint8 [capacity, row_nbytes]`` slab (``np.empty``: pages are touched only as rows
arrive), an id -> slot dict and a last-used tick per slot. A lookup is one dict probe
per distinct id; eviction is batched: when a batch of missed rows arrives, the
least-recently-used slots (by tick, one tick per lookup) are reused in one
``argpartition``. Counters count distinct ids per lookup (duplicates in a batch are one
probe). ``bytes`` counts the cached rows' payload; the index costs about 100 more bytes
per row on top.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from runtime.redis_tier.layout import TableLayout
from runtime.serving.cache import CacheStats

# The user cache's counters (hits, misses, evictions, entries, bytes; rows never expire here).
HotCacheStats = CacheStats


class _Pool:
    """One table's slab of cached rows."""

    def __init__(self, row_nbytes: int, capacity: int) -> None:
        self.row_nbytes = row_nbytes
        self.capacity = capacity
        self.slot_of: dict[int, int] = {}
        self.ids = np.full(capacity, -1, np.int64)
        self.ticks = np.zeros(capacity, np.int64)
        self.rows = np.empty((capacity, row_nbytes), np.uint8)
        self.used = 0

    def probe(self, ids: np.ndarray, tick: int) -> np.ndarray:
        """Slot per id (-1 for a miss); hits get ``tick``."""
        get = self.slot_of.get
        slots = np.fromiter((get(i, -1) for i in ids.tolist()), np.int64, len(ids))
        self.ticks[slots[slots >= 0]] = tick
        return slots

    def insert(self, ids: np.ndarray, rows: np.ndarray, tick: int) -> int:
        """Cache ``rows`` under ``ids`` (not cached yet), evicting LRU slots; returns evictions."""
        n = min(len(ids), self.capacity)
        ids, rows = ids[:n], rows[:n]
        free = self.capacity - self.used
        slots = np.arange(self.used, self.used + min(n, free))
        evicted = n - len(slots)
        if evicted:
            victims = np.argpartition(self.ticks[: self.used], evicted - 1)[:evicted]
            for old in self.ids[victims].tolist():
                del self.slot_of[old]
            slots = np.concatenate([slots, victims])
        self.used += min(n, free)
        self.rows[slots] = rows
        self.ids[slots] = ids
        self.ticks[slots] = tick
        self.slot_of.update(zip(ids.tolist(), slots.tolist(), strict=True))
        return evicted


class HotRowCache:
    """Raw rows by (table, id), LRU, at most ``max_bytes`` of row payload in total."""

    def __init__(self, max_bytes: int, layouts: Mapping[str, TableLayout]) -> None:
        if max_bytes < 0:
            raise ValueError(f"HotRowCache needs max_bytes >= 0, got {max_bytes}")
        total = sum(t.nbytes for t in layouts.values()) or 1
        self.max_bytes = int(max_bytes)
        self._pools = {
            name: _Pool(t.row_nbytes, min(t.rows, int(max_bytes * t.nbytes / total) // t.row_nbytes))
            for name, t in layouts.items()
        }
        self._lock = threading.Lock()
        self._tick = 0
        self._stats = HotCacheStats(max_bytes=self.max_bytes)

    @property
    def enabled(self) -> bool:
        return any(p.capacity for p in self._pools.values())

    def get(self, table: str, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the cached rows of distinct ``ids`` into ``out``; returns the miss mask."""
        pool = self._pools[table]
        if not pool.capacity:
            self._count(0, len(ids))
            return np.ones(len(ids), bool)
        with self._lock:
            self._tick += 1
            slots = pool.probe(ids, self._tick)
            hit = slots >= 0
            out[hit] = pool.rows[slots[hit]]
            self._stats.hits += int(hit.sum())
            self._stats.misses += int(len(ids) - hit.sum())
        return ~hit

    def put(self, table: str, ids: np.ndarray, rows: np.ndarray) -> None:
        """Cache rows just fetched for distinct ``ids`` that missed."""
        pool = self._pools[table]
        if not pool.capacity or not len(ids):
            return
        with self._lock:
            fresh = np.fromiter((i not in pool.slot_of for i in ids.tolist()), bool, len(ids))
            evicted = pool.insert(ids[fresh], rows[fresh], self._tick)
            self._stats.evictions += evicted

    def clear(self) -> None:
        """Drop every cached row (counters stay): e.g. after a warm-up whose rows say nothing
        about the traffic to come."""
        with self._lock:
            for pool in self._pools.values():
                pool.slot_of.clear()
                pool.ids[:] = -1
                pool.ticks[:] = 0
                pool.used = 0

    def stats(self) -> HotCacheStats:
        """A consistent snapshot of the counters and sizes."""
        with self._lock:
            st = HotCacheStats(**vars(self._stats))
            st.entries = sum(p.used for p in self._pools.values())
            st.bytes = sum(p.used * p.row_nbytes for p in self._pools.values())
        return st

    def _count(self, hits: int, misses: int) -> None:
        with self._lock:
            self._stats.hits += hits
            self._stats.misses += misses
