"""A Redis Cluster embedding tier with an in-process hot-row cache (see docs/embedding-tier.md).

    from runtime.redis_tier import RedisTier, push, ArrayTable
    push("redis://127.0.0.1:7000", [ArrayTable.from_float("item", table)], version)
    tier = RedisTier.open("redis://127.0.0.1:7000", version, cache_bytes=64 << 20)
    vectors = tier.lookup("item", ids)

Needs redis-py (``pip install 'ugsep[redis]'``), imported on first connect.
"""

from __future__ import annotations

from runtime.errors import TierUnavailableError
from runtime.redis_tier.connection import TierConfig, connect
from runtime.redis_tier.hotcache import HotCacheStats, HotRowCache
from runtime.redis_tier.layout import TableLayout, decode_rows
from runtime.redis_tier.push import PushReport, VersionInfo, list_versions, push, remove_version
from runtime.redis_tier.tables import ArrayTable, TableSource
from runtime.redis_tier.tier import RedisTier, TierStats

__all__ = [
    "RedisTier",
    "TierConfig",
    "TierStats",
    "TierUnavailableError",
    "HotRowCache",
    "HotCacheStats",
    "TableLayout",
    "TableSource",
    "ArrayTable",
    "PushReport",
    "VersionInfo",
    "push",
    "list_versions",
    "remove_version",
    "connect",
    "decode_rows",
]
