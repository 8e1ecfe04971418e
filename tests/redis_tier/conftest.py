"""Fixtures: a real three-master Redis Cluster on loopback (module-scoped), started per module."""

from __future__ import annotations

import pytest

from tests.redis_tier.redis_cluster import LocalRedisCluster, require_redis_server


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """Three masters, no replicas; stopped (and every node process reaped) after the module."""
    require_redis_server()
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis"), masters=3)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
