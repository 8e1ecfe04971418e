"""User cache: byte bound, TTL, LRU, counters, keys, thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from runtime.errors import RequestError
from runtime.serving.batcher import run_batch
from runtime.serving.cache import UserCache, explicit_user_key, user_feature_key
from tests.serving.conftest import make_request


def _row(value: float, width: int = 16) -> dict[str, np.ndarray]:
    return {"user_vec": np.full((1, width), value, np.float32)}  # 64 bytes at width 16


def test_byte_bound_evicts_least_recently_used():
    cache = UserCache(max_bytes=3 * 64)
    for k in "abc":
        assert cache.put(k, _row(ord(k)))
    assert cache.get("a") is not None  # a becomes most recent; b is now the oldest
    cache.put("d", _row(4))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    st = cache.stats()
    assert (st.entries, st.bytes, st.evictions) == (3, 3 * 64, 1)
    assert (st.hits, st.misses) == (3, 1)


def test_entry_larger_than_bound_is_not_stored():
    cache = UserCache(max_bytes=32)
    assert not cache.put("big", _row(1.0))
    assert cache.stats().bytes == 0 and cache.get("big") is None


def test_ttl_expires_entries():
    now = [100.0]
    cache = UserCache(max_bytes=1024, ttl_s=5.0, clock=lambda: now[0])
    cache.put("u", _row(1.0))
    now[0] = 104.9
    assert cache.get("u") is not None
    now[0] = 105.0
    assert cache.get("u") is None
    st = cache.stats()
    assert (st.expirations, st.entries, st.bytes) == (1, 0, 0)


def test_cached_tensors_are_private_and_read_only():
    src = _row(1.0)
    cache = UserCache(max_bytes=1024)
    cache.put("u", src)
    src["user_vec"][0, 0] = 99.0
    got = cache.get("u")["user_vec"]
    assert got[0, 0] == 1.0
    with pytest.raises(ValueError):
        got[0, 0] = 2.0


def test_feature_key_depends_on_values_dtype_and_shape():
    a = {"x": np.arange(4, dtype=np.int64).reshape(1, 4)}
    assert user_feature_key(a) == user_feature_key({"x": a["x"].copy()})
    assert user_feature_key(a) != user_feature_key({"x": a["x"].astype(np.int32)})
    assert user_feature_key(a) != user_feature_key({"x": a["x"].reshape(1, 2, 2)})
    assert user_feature_key(a) != user_feature_key({"x": a["x"] + 1})
    assert explicit_user_key("u1") != user_feature_key(a)
    with pytest.raises(RequestError, match="user_key"):
        explicit_user_key(123)


def test_byte_bound_holds_under_a_stream_of_distinct_users(scorer):
    bound = 10 * 16 * 4  # room for ten boundary rows of 16 float32
    cache = UserCache(max_bytes=bound)
    for batch in range(25):
        prepared = [scorer.prepare(*make_request(batch * 8 + i, n=3)) for i in range(8)]
        run_batch(scorer, cache, prepared)
        st = cache.stats()
        assert st.bytes <= bound and st.entries <= 10
    st = cache.stats()
    assert st.misses == 200 and st.evictions == 190 and st.bytes == bound


def test_concurrent_threads_keep_the_accounting_consistent():
    cache = UserCache(max_bytes=50 * 64)

    def worker(t: int) -> None:
        for i in range(300):
            key = f"u{(t * 7 + i) % 120}"
            if cache.get(key) is None:
                cache.put(key, _row(float(i)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    st = cache.stats()
    assert st.bytes == st.entries * 64 <= 50 * 64
    assert st.hits + st.misses == 4 * 300
