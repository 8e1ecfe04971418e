"""Backends behind a registry with lazy imports (as Polygraphy does).

A backend module is only a dotted name until first use, so ``import runtime``
imports neither TensorRT nor CUDA. ``get_backend(name)`` imports it; a missing
dependency raises ``BackendUnavailableError`` saying what to install.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from runtime.errors import BackendUnavailableError

# name -> "module:Class". Order of AUTO_ORDER is the preference of backend="auto".
REGISTRY: dict[str, str] = {
    "onnxruntime": "runtime.backends.ort:OrtBackend",
    "ort-cuda": "runtime.backends.ort:OrtCudaBackend",
    "ort-tensorrt": "runtime.backends.ort:OrtTensorrtBackend",
    "tensorrt": "runtime.backends.tensorrt:TrtBackend",
}
AUTO_ORDER = ("tensorrt", "ort-tensorrt", "ort-cuda", "onnxruntime")


class Session(Protocol):
    """One compiled graph ready to run."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    """Turns a bundle stage into a Session."""

    name: str
    needs_gpu: bool  # GPU backends run the group graph for every call (group_small is CPU-tuned)
    group_chunk_candidates: int  # the batcher's group-call size (0: one call per batch)

    @classmethod
    def availability(cls, bundle) -> str | None:
        """None when usable for this bundle on this machine, else the reason it is not."""

    def open(self, bundle, stage: str) -> Session: ...


def backend_class(name: str):
    """Import and return the backend class registered under ``name``."""
    if name not in REGISTRY:
        raise BackendUnavailableError(
            f"unknown backend '{name}'; known backends: {', '.join(REGISTRY)} (or 'auto')"
        )
    module, _, cls = REGISTRY[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise BackendUnavailableError(
            f"backend '{name}' cannot be imported ({e}); install ugsep[gpu] for GPU backends"
        ) from e


def resolve_backend(name: str, bundle, **options) -> Backend:
    """Instantiate backend ``name`` (or the best available for ``auto``) for this bundle."""
    if name != "auto":
        cls = backend_class(name)
        reason = cls.availability(bundle)
        if reason:
            raise BackendUnavailableError(f"backend '{name}' is not usable here: {reason}")
        return cls(**options)
    reasons = []
    for candidate in AUTO_ORDER:
        try:
            cls = backend_class(candidate)
        except BackendUnavailableError as e:
            reasons.append(f"{candidate}: {e}")
            continue
        reason = cls.availability(bundle)
        if reason is None:
            return cls(**options)
        reasons.append(f"{candidate}: {reason}")
    raise BackendUnavailableError("no backend is usable: " + "; ".join(reasons))
