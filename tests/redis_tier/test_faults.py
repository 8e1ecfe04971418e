"""Faults against a real cluster: a master killed mid-run, restarted, or failed over to its replica.

A lookup that needs rows of the dead node raises TierUnavailableError within the client's
timeout budget (never zeros), rows from the hot cache and from live nodes are still served,
and the same RedisTier object recovers when the node returns.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from runtime.errors import TierUnavailableError
from runtime.redis_tier import RedisTier, TierConfig, push
from runtime.redis_tier.layout import bucket_key
from tests.redis_tier.redis_cluster import LocalRedisCluster, require_redis_server
from tests.redis_tier.tables_for_tests import expected_rows, make_arrays, make_tables

ARRAYS = make_arrays(seed=5, rows=3000)
TABLE = "user_f32"
VERSION = "faults01"
# generous: the point is "bounded, no hang"; the budget is about (retries + 1) * socket timeout
FAIL_FAST_S = 5.0


def _cluster(tmp_path, replicas: int) -> LocalRedisCluster:
    require_redis_server()
    return LocalRedisCluster(tmp_path / "redis", masters=3, replicas=replicas).start()


def _ids_by_port(tier: RedisTier) -> dict[int, np.ndarray]:
    """All ids of TABLE grouped by the port of the master that holds their bucket now."""
    t = tier.layouts[TABLE]
    ids = np.arange(t.rows)
    port_of_bucket = [tier._client.get_node_from_key(bucket_key(t, b)).port for b in range(t.buckets)]
    ports = np.array(port_of_bucket)[ids % t.buckets]
    return {int(p): ids[ports == p] for p in np.unique(ports)}


def _lookup_or_error(tier, ids):
    try:
        return tier.lookup(TABLE, ids)
    except TierUnavailableError as e:
        return e


@pytest.mark.slow
def test_node_killed_fails_fast_serves_cache_and_recovers_after_restart(tmp_path):
    cluster = _cluster(tmp_path, replicas=0)
    try:
        push(cluster.url, make_tables(ARRAYS), VERSION)
        config = TierConfig(cluster.url, socket_timeout_s=0.5, connect_timeout_s=0.25, retries=2)
        tier = RedisTier.open(config, VERSION, cache_bytes=ARRAYS[TABLE][0].nbytes // 10)
        by_port = _ids_by_port(tier)
        victim, other = sorted(by_port)[0], sorted(by_port)[1]
        cached = by_port[victim][:50]
        tier.lookup(TABLE, cached)                               # warm the hot cache
        cluster.kill(victim)

        t0 = time.monotonic()
        with pytest.raises(TierUnavailableError, match=f"embedding tier {config.name} unavailable"):
            tier.lookup(TABLE, by_port[victim][100:150])         # uncached rows of the dead node
        assert time.monotonic() - t0 < FAIL_FAST_S
        np.testing.assert_array_equal(tier.lookup(TABLE, cached), expected_rows(ARRAYS, TABLE, cached))
        live = by_port[other][200:260]
        np.testing.assert_array_equal(tier.lookup(TABLE, live), expected_rows(ARRAYS, TABLE, live))
        mixed = np.concatenate([live, by_port[victim][300:310]])
        with pytest.raises(TierUnavailableError):                # one dead row fails the lookup: no zeros
            tier.lookup(TABLE, mixed)

        cluster.restart(victim)
        cluster.wait_ok()
        ids = by_port[victim][100:400]
        deadline = time.monotonic() + 20
        while isinstance(got := _lookup_or_error(tier, ids), TierUnavailableError) and time.monotonic() < deadline:
            time.sleep(0.1)
        np.testing.assert_array_equal(got, expected_rows(ARRAYS, TABLE, ids))
        assert tier.stats().failures >= 2
    finally:
        cluster.stop()


@pytest.mark.slow
def test_master_killed_fails_over_to_its_replica_without_wrong_rows(tmp_path):
    cluster = _cluster(tmp_path, replicas=1)
    try:
        push(cluster.url, make_tables(ARRAYS), VERSION)
        for port in cluster.master_ports():
            cluster.cli(port, "wait", "1", "2000")            # its replica caught up
        config = TierConfig(cluster.url, socket_timeout_s=0.5, connect_timeout_s=0.25, retries=2)
        tier = RedisTier.open(config, VERSION)
        by_port = _ids_by_port(tier)
        victim = sorted(by_port)[0]
        ids = by_port[victim][:200]
        cluster.kill(victim)
        outcomes, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            got = _lookup_or_error(tier, ids)
            assert time.monotonic() - t0 < FAIL_FAST_S
            outcomes.append(got)
            if not isinstance(got, TierUnavailableError):
                break
            time.sleep(0.1)
        assert not isinstance(outcomes[-1], TierUnavailableError), "no fail-over within 30 s"
        np.testing.assert_array_equal(outcomes[-1], expected_rows(ARRAYS, TABLE, ids))
        assert victim not in cluster.master_ports()
    finally:
        cluster.stop()
