"""Push / lookup / ls / rm against a real three-master Redis Cluster started by the test."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from runtime.errors import BundleError, RequestError, TierUnavailableError
from runtime.redis_tier import (
    ArrayTable,
    RedisTier,
    connect,
    list_versions,
    push,
    remove_version,
)
from runtime.redis_tier.connection import TierConfig
from runtime.redis_tier.layout import bucket_key, progress_key
from tests.redis_tier.tables_for_tests import expected_raw, expected_rows, make_arrays, make_tables

ARRAYS = make_arrays(seed=0)
VERSION = "c0ffee01"


@pytest.fixture(scope="module")
def pushed(redis_cluster):
    report = push(redis_cluster.url, make_tables(ARRAYS), VERSION, progress=True)
    assert report.chunks_written > 0 and report.chunks_skipped == 0
    return redis_cluster


def _zipf_ids(rng, rows, shape):
    return np.minimum(rng.zipf(1.2, shape) - 1, rows - 1).astype(np.int64)


def test_round_trip_is_bytes_exact_for_every_dtype(pushed):
    tier = RedisTier.open(pushed.url, VERSION)
    rng = np.random.default_rng(1)
    for name, a in ARRAYS.items():
        rows = a[0].shape[0]
        ids = np.concatenate([[0, rows - 1, 7, 7], rng.integers(0, rows, 300)]).reshape(4, 76)
        raw = tier.lookup_raw_many({name: ids})[name]
        np.testing.assert_array_equal(raw, expected_raw(ARRAYS, name, ids))
        vec = tier.lookup(name, ids)
        assert vec.dtype == np.float32 and vec.shape == ids.shape + (expected_rows(ARRAYS, name, ids).shape[-1],)
        np.testing.assert_array_equal(vec, expected_rows(ARRAYS, name, ids))
    tier.close()


def test_one_hmget_per_bucket_and_duplicates_fetched_once(pushed):
    tier = RedisTier.open(pushed.url, VERSION)
    for port in pushed.master_ports():
        pushed.cli(port, "config", "resetstat")
    ids = np.array([5, 5, 5, 37, 69, 6, 6, 1000])  # buckets (16 of them): 5, 5, 5, 6, 6, 8
    out = tier.lookup_many({"user_f32": ids, "item_i8": ids[:3]})
    np.testing.assert_array_equal(out["user_f32"], expected_rows(ARRAYS, "user_f32", ids))
    calls = {"hmget": 0, "eval": 0}
    for port in pushed.master_ports():
        for line in pushed.cli(port, "info", "commandstats").splitlines():
            for cmd in calls:
                if line.startswith(f"cmdstat_{cmd}:"):
                    calls[cmd] += int(line.split("calls=")[1].split(",")[0])
    assert calls == {"hmget": 3 + 1, "eval": 3 + 1}  # user_f32: buckets 5, 6, 8; item_i8: bucket 5
    assert tier.stats().rows_fetched == 5 + 1 and tier.stats().fetches == 1


def test_hot_cache_counts_hits_misses_evictions_within_its_byte_bound(pushed):
    row = 16 * 4
    tier = RedisTier.open(pushed.url, VERSION, cache_bytes=0)
    layouts = {"user_f32": tier.layouts["user_f32"]}
    tier = RedisTier(tier.config, VERSION, layouts, connect(tier.config), cache_bytes=4 * row)
    tier.lookup("user_f32", np.array([1, 2, 3, 3]))           # 3 misses
    tier.lookup("user_f32", np.array([1, 2]))                 # 2 hits (1 and 2 now newest)
    tier.lookup("user_f32", np.array([4, 5]))                 # 2 misses, 1 eviction: 3 is LRU
    st = tier.cache.stats()
    assert (st.hits, st.misses, st.evictions, st.entries) == (2, 5, 1, 4)
    assert st.bytes == 4 * row <= st.max_bytes
    before = tier.stats().rows_fetched
    np.testing.assert_array_equal(tier.lookup("user_f32", np.array([1, 2, 4, 5])),
                                  expected_rows(ARRAYS, "user_f32", np.array([1, 2, 4, 5])))
    assert tier.stats().rows_fetched == before                # all four from the cache
    tier.lookup("user_f32", np.array([3]))
    assert tier.stats().rows_fetched == before + 1            # 3 was the one evicted
    assert tier.cache.stats().bytes <= 4 * row


def test_incomplete_or_absent_version_is_refused_by_name(pushed):
    with pytest.raises(TierUnavailableError, match="no version deadbeef.*ugsep embeddings push"):
        RedisTier.open(pushed.url, "deadbeef")
    client = connect(TierConfig(pushed.url))
    push(pushed.url, make_tables({"t": ARRAYS["user_f32"]}), "halfdone")
    client.delete("ugsep:{halfdone}:done")                    # as if the push died before its marker
    with pytest.raises(TierUnavailableError, match="an incomplete push of version halfdone"):
        RedisTier.open(pushed.url, "halfdone")
    remove_version(pushed.url, "halfdone")


def test_bundle_expecting_other_tables_is_refused(pushed):
    want = {t.layout.name: t.layout for t in make_tables(make_arrays(seed=0, dim=8))}
    with pytest.raises(BundleError, match=r"version c0ffee01: table 'user_f32' is 5000 x 16 float32 there, the bundle expects 5000 x 8 float32"):
        RedisTier.open(pushed.url, VERSION, expected=want)


def test_bad_ids_are_request_errors(pushed):
    tier = RedisTier.open(pushed.url, VERSION)
    with pytest.raises(RequestError, match="id 5000 is out of range for table 'user_f32'"):
        tier.lookup("user_f32", np.array([1, 5000]))
    with pytest.raises(RequestError, match="id -1 is out of range"):
        tier.lookup("user_f32", np.array([-1]))
    with pytest.raises(RequestError, match="no table 'nope'"):
        tier.lookup("nope", np.array([1]))


def test_ls_and_rm(pushed):
    push(pushed.url, make_tables({"t": ARRAYS["user_f32"]}), "tmpver")
    infos = {v.version: v for v in list_versions(pushed.url)}
    assert infos["tmpver"].complete and infos[VERSION].complete
    assert infos["tmpver"].nbytes == ARRAYS["user_f32"][0].nbytes
    assert remove_version(pushed.url, "tmpver") == 1 + 16 + 2   # marker, 16 buckets, progress + meta
    assert "tmpver" not in {v.version for v in list_versions(pushed.url)}
    client = connect(TierConfig(pushed.url))
    assert not [k for k in client.scan_iter(match="*tmpver*")]
    with pytest.raises(TierUnavailableError, match="no version tmpver"):
        RedisTier.open(pushed.url, "tmpver")
    with pytest.raises(BundleError, match="holds no version tmpver"):
        remove_version(pushed.url, "tmpver")


_PUSH_SCRIPT = """
import sys
from tests.redis_tier.tables_for_tests import make_arrays, make_tables
from runtime.redis_tier import push
arrays = make_arrays(seed=3, rows=20000)
push(sys.argv[1], make_tables(arrays), "resume1", chunk_rows=250)
"""


@pytest.mark.slow
def test_interrupted_push_resumes_and_completes(pushed, tmp_path):
    """A push killed (SIGKILL) mid-way leaves no marker; re-running skips its chunks and completes."""
    proc = subprocess.Popen([sys.executable, "-c", _PUSH_SCRIPT, pushed.url])
    client = connect(TierConfig(pushed.url))
    deadline = time.monotonic() + 60
    while client.hlen(progress_key("resume1")) < 20 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    written_before = client.hlen(progress_key("resume1"))
    total = 80 + 40 + 80                                         # chunks of 250 rows per table
    assert 20 <= written_before < total, "the push finished before it could be interrupted"
    with pytest.raises(TierUnavailableError, match="incomplete push of version resume1"):
        RedisTier.open(pushed.url, "resume1")
    arrays = make_arrays(seed=3, rows=20000)
    report = push(pushed.url, make_tables(arrays), "resume1", chunk_rows=250)
    assert report.chunks_skipped >= written_before and report.chunks_written + report.chunks_skipped == total
    tier = RedisTier.open(pushed.url, "resume1")
    for name, a in arrays.items():
        ids = np.arange(a[0].shape[0])
        np.testing.assert_array_equal(tier.lookup_raw_many({name: ids})[name], expected_raw(arrays, name, ids))
    again = push(pushed.url, make_tables(arrays), "resume1", chunk_rows=250)   # idempotent
    assert again.chunks_written == 0
    remove_version(pushed.url, "resume1")


def test_push_of_an_existing_version_with_other_tables_is_refused(pushed):
    with pytest.raises(BundleError, match=f"already holds version {VERSION} with other tables"):
        push(pushed.url, [ArrayTable.from_float("user_f32", np.zeros((3, 2), np.float32))], VERSION)


def test_a_row_lost_by_the_cluster_is_an_error_never_zeros(pushed):
    push(pushed.url, make_tables({"t": ARRAYS["user_f32"]}), "lossy")
    tier = RedisTier.open(pushed.url, "lossy")
    t = tier.layouts["t"]
    client = connect(TierConfig(pushed.url))
    assert client.hdel(bucket_key(t, 42 % t.buckets), "42") == 1     # as a node restarted without its data
    with pytest.raises(TierUnavailableError, match="table 't' lost rows.*missing row 42"):
        tier.lookup("t", np.array([41, 42, 43]))
    np.testing.assert_array_equal(tier.lookup("t", np.array([41, 43])), expected_rows(ARRAYS, "user_f32", np.array([41, 43])))
    remove_version(pushed.url, "lossy")


def test_store_lookup_many_splits_back_per_lookup_with_repeated_tables(pushed):
    from runtime.redis_tier.store import RedisStore

    store = RedisStore(RedisTier.open(pushed.url, VERSION))
    requests = [("user_f32", np.array([[1, 2], [3, 1]])), ("item_i8", np.array([[9], [8], [9]])),
                ("user_f32", np.array([7, 1, 4000])), ("item_i8", np.zeros((0, 2), np.int64))]
    got = store.lookup_many(requests)
    assert store.tier.stats().fetches == 1                        # one round trip for all of them
    assert got[3].shape == (0, 2, 16)
    for (name, ids), vec in zip(requests, got, strict=True):
        np.testing.assert_array_equal(vec, expected_rows(ARRAYS, name, ids))
