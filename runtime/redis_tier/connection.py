"""Connecting to the Redis Cluster tier, and turning its failures into one error.

redis-py's cluster client (with hiredis when installed) routes every key to the node that
owns its slot, follows MOVED/ASK redirections and refreshes the topology after connection
errors, so a node that comes back, or a replica promoted in its place, is picked up
without restarting the process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

from runtime.errors import BackendUnavailableError, TierUnavailableError

DEFAULT_SOCKET_TIMEOUT_S = 1.0
DEFAULT_CONNECT_TIMEOUT_S = 0.5
DEFAULT_RETRIES = 2


@dataclass(frozen=True)
class TierConfig:
    """Where the tier is and how long a request may wait for it.

    The worst case for one lookup against an unresponsive node is about
    ``(retries + 1) * socket_timeout_s`` plus the backoffs (~2 s with the defaults); a node
    whose process is gone refuses connections at once, so that case fails in milliseconds.
    """

    url: str
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    backoff_s: float = 0.05

    def __post_init__(self) -> None:
        u = urlparse(self.url)
        if u.scheme not in ("redis", "rediss") or not u.hostname:
            raise TierUnavailableError(f"embedding tier URL {self.url!r}: expected redis://HOST:PORT")
        if self.socket_timeout_s <= 0 or self.connect_timeout_s <= 0 or self.retries < 0:
            raise TierUnavailableError(f"embedding tier {self.url}: timeouts must be > 0 and retries >= 0")

    @property
    def name(self) -> str:
        """The URL without credentials, for messages and metric labels."""
        u = urlparse(self.url)
        return f"{u.scheme}://{u.hostname}:{u.port or 6379}"


def _redis():
    try:
        import redis
        from redis.cluster import RedisCluster
    except ImportError as e:
        raise BackendUnavailableError(
            "the Redis embedding tier needs redis-py: pip install 'ugsep[redis]' (redis>=5 with hiredis)"
        ) from e
    return redis, RedisCluster


def connect(config: TierConfig):
    """A ``redis.cluster.RedisCluster`` for ``config`` (TierUnavailableError if unreachable)."""
    redis, RedisCluster = _redis()
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    retry = Retry(ExponentialBackoff(cap=4 * config.backoff_s, base=config.backoff_s), config.retries)
    with tier_errors(config, "connecting"):
        return RedisCluster.from_url(
            config.url,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.connect_timeout_s,
            retry=retry,
            require_full_coverage=False,
        )


@contextlib.contextmanager
def tier_errors(config: TierConfig, action: str) -> Iterator[None]:
    """Re-raise any Redis failure inside the block as one TierUnavailableError naming the tier."""
    redis, _ = _redis()
    try:
        yield
    except TierUnavailableError:
        raise
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TierUnavailableError(
            f"embedding tier {config.name} unavailable while {action}: {type(e).__name__}: {detail}"
        ) from e
