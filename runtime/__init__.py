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
from runtime.signing import BundleKey, SignatureError, load_key, sign_bundle
from runtime.spec import FeatureSpec, InputSpec

__all__ = [
    "load",
    "Bundle",
    "Manifest",
    "FeatureSpec",
    "InputSpec",
    "Scorer",
    "pack",
    "BundleKey",
    "load_key",
    "sign_bundle",
    "SignatureError",
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
    verify: str | Path | BundleKey | None = None,
    allow_extra_files: bool = False,
    embeddings=None,  # a redis:// URL or runtime.redis_tier.TierConfig
    embeddings_cache_bytes: int = 0,
    **backend_options,
) -> Scorer:
    """Open, verify and parity-check a bundle, and return a Scorer on ``backend``.

    ``backend="auto"`` picks the best usable backend (TensorRT engine for this GPU,
    ORT TensorRT/CUDA providers, else ORT CPU) and logs which. A bundle whose files do
    not match their sha256, or whose manifest does not describe its files and graphs
    (runtime/bundle_checks.py), is refused; one with no or a failed parity record is
    refused unless ``allow_unverified``. ``verify``: a key (PEM Ed25519 file, ``hmac:FILE``
    or a ``BundleKey``) whose signature the bundle must carry (runtime/signing.py).
    ``allow_extra_files``: ignore files the manifest does not list (with a warning).
    ``embeddings="redis://HOST:PORT"`` looks the store's rows up
    in a Redis Cluster tier (runtime/redis_tier) behind a hot-row cache of
    ``embeddings_cache_bytes``, pinned to the store's version; TierUnavailableError until
    the cluster holds that version complete.
    """
    bundle = Bundle.open(path, key=verify, allow_extra_files=allow_extra_files)
    bundle.check_parity(allow_unverified=allow_unverified)
    be = resolve_backend(backend, bundle, **backend_options)
    if backend == "auto":
        log.info("backend auto picked '%s' for bundle '%s'", be.name, bundle.root)
    if be.name == "onnxruntime":
        from runtime.cpu import int8_saturation_warning

        warning = int8_saturation_warning(bundle.manifest.quantization)
        if warning:
            log.warning("bundle '%s': %s", bundle.root, warning)
    store = None
    if embeddings:
        from runtime.redis_tier.store import RedisStore

        store = RedisStore.for_bundle(bundle, embeddings, cache_bytes=embeddings_cache_bytes)
    return Scorer(bundle, be, use_split=use_split, embeddings=store)
