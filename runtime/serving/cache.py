"""The user-side cache: boundary tensors per user, bounded in bytes, with a TTL.

A repeat request for a user whose boundary tensors are cached skips the user graph.
Entries are LRU-ordered; the byte bound counts ``nbytes`` of the cached arrays, so the
cache never holds more than ``max_bytes`` of tensors. Every operation takes one short
``threading.Lock`` and never blocks on I/O, so the cache is safe to use from worker
threads and from asyncio code alike.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from runtime.errors import RequestError

MAX_USER_KEY_LENGTH = 256


def user_feature_key(user: Mapping[str, np.ndarray]) -> str:
    """A stable key for one user's features: blake2b of names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(user):
        arr = np.ascontiguousarray(user[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return "h:" + h.hexdigest()


def explicit_user_key(key: object) -> str:
    """Namespace a caller-supplied user key so it can never collide with a feature hash."""
    if not isinstance(key, str) or not key or len(key) > MAX_USER_KEY_LENGTH:
        raise RequestError(
            f"parameter 'user_key' must be a non-empty string of at most {MAX_USER_KEY_LENGTH} "
            f"characters; got {type(key).__name__} {str(key)[:40]!r}"
        )
    return "k:" + key


@dataclass
class CacheStats:
    """Counters since the cache was created (a snapshot)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class _Entry:
    tensors: dict[str, np.ndarray]
    nbytes: int
    expires: float


class UserCache:
    """LRU map user key -> boundary tensors (each [1, ...]), bounded in bytes, with TTL.

    ``max_bytes=0`` disables caching (every ``get`` is a miss and ``put`` stores nothing).
    """

    def __init__(
        self, max_bytes: int, ttl_s: float = 300.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_bytes < 0 or ttl_s <= 0:
            raise ValueError(f"UserCache needs max_bytes >= 0 and ttl_s > 0, got {max_bytes}, {ttl_s}")
        self.max_bytes = int(max_bytes)
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._stats = CacheStats(max_bytes=self.max_bytes)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The cached tensors for ``key`` (refreshing its LRU position), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires <= self._clock():
                self._drop(key)
                self._stats.expirations += 1
                entry = None
            if entry is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            return entry.tensors

    def put(self, key: str, tensors: Mapping[str, np.ndarray]) -> bool:
        """Store private read-only copies of ``tensors``; False if they can never fit."""
        copies = {k: np.array(v, copy=True) for k, v in tensors.items()}
        for arr in copies.values():
            arr.flags.writeable = False  # shared between requests: nobody may mutate it
        nbytes = sum(a.nbytes for a in copies.values())
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._drop(key)
            while self._entries and self._stats.bytes + nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self._stats.evictions += 1
            self._entries[key] = _Entry(copies, nbytes, self._clock() + self.ttl_s)
            self._stats.bytes += nbytes
            self._stats.entries = len(self._entries)
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._stats.bytes = 0
            self._stats.entries = 0

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return CacheStats(**vars(self._stats))

    def _drop(self, key: str) -> None:  # caller holds the lock
        entry = self._entries.pop(key)
        self._stats.bytes -= entry.nbytes
        self._stats.entries = len(self._entries)
