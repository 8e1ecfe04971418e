"""Serving: user cache, dynamic batcher, KServe v2 HTTP server, Prometheus metrics.

    from runtime.serving import serve, build_app
    serve(["bundle/"], host="127.0.0.1", port=8000, cache_bytes=64 << 20, token=None)

Imports fastapi/uvicorn lazily, so ``import runtime.serving`` works without them
until a server is built.
"""

from __future__ import annotations

from runtime.serving.batcher import (
    Batcher,
    BatchInfo,
    OverloadedError,
    ShuttingDownError,
    run_batch,
)
from runtime.serving.cache import CacheStats, UserCache, explicit_user_key, user_feature_key
from runtime.serving.repository import ServeOptions

__all__ = [
    "serve",
    "build_app",
    "ServerThread",
    "ServeOptions",
    "UserCache",
    "CacheStats",
    "user_feature_key",
    "explicit_user_key",
    "Batcher",
    "BatchInfo",
    "run_batch",
    "OverloadedError",
    "ShuttingDownError",
]


def __getattr__(name: str):
    if name == "build_app":
        from runtime.serving.app import build_app

        return build_app
    if name in ("serve", "ServerThread"):
        from runtime.serving import server

        return getattr(server, name)
    raise AttributeError(f"module 'runtime.serving' has no attribute '{name}'")
