"""ugsep runtime: load a verified bundle and score requests. Never imports torch."""

from __future__ import annotations

import logging
from pathlib import Path

from runtime.backends import resolve_backend
from runtime.bundle import Bundle, pack, sha256_file
from runtime.errors import (
    BackendUnavailableError,
    BundleError,
    InternalError,
    ParityError,
    RequestError,
    SpecError,
    UgsepError,
)
from runtime.manifest import FORMAT_VERSION, Manifest
from runtime.scorer import Scorer
from runtime.spec import FeatureSpec, InputSpec

__all__ = [
    "load",
    "Bundle",
    "Manifest",
    "FeatureSpec",
    "InputSpec",
    "Scorer",
    "pack",
    "sha256_file",
    "FORMAT_VERSION",
    "UgsepError",
    "BundleError",
    "ParityError",
    "RequestError",
    "SpecError",
    "BackendUnavailableError",
    "InternalError",
]

log = logging.getLogger(__name__)


def load(
    path: str | Path,
    backend: str = "auto",
    *,
    allow_unverified: bool = False,
    use_split: bool = True,
    embeddings=None,  # a redis:// URL or runtime.redis_tier.TierConfig
    embeddings_cache_bytes: int = 0,
    **backend_options,
) -> Scorer:
    """Open, verify and parity-check a bundle, and return a Scorer on ``backend``.

    ``backend="auto"`` picks the best usable backend (TensorRT engine for this GPU,
    ORT TensorRT/CUDA providers, else ORT CPU) and logs which. A bundle whose files do
    not match their sha256 is refused; one with no or a failed parity record is refused
    unless ``allow_unverified``. ``embeddings="redis://HOST:PORT"`` looks the store's rows up
    in a Redis Cluster tier (runtime/redis_tier) behind a hot-row cache of
    ``embeddings_cache_bytes``, pinned to the store's version; TierUnavailableError until
    the cluster holds that version complete.
    """
    bundle = Bundle.open(path)
    bundle.check_parity(allow_unverified=allow_unverified)
    be = resolve_backend(backend, bundle, **backend_options)
    if backend == "auto":
        log.info("backend auto picked '%s' for bundle '%s'", be.name, bundle.root)
    store = None
    if embeddings:
        from runtime.redis_tier.store import RedisStore

        store = RedisStore.for_bundle(bundle, embeddings, cache_bytes=embeddings_cache_bytes)
    return Scorer(bundle, be, use_split=use_split, embeddings=store)
