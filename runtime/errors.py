"""The runtime's error family. Everything a user can cause is a subclass of UgsepError."""

from __future__ import annotations


class UgsepError(Exception):
    """Base of every error ugsep raises on purpose."""


class SpecError(UgsepError, ValueError):
    """A feature spec is malformed or inconsistent."""


class BundleError(UgsepError):
    """A bundle is missing, corrupt, tampered with, or of an unsupported format."""


class ParityError(BundleError):
    """A bundle has no parity record, or a failed one, and was not explicitly allowed."""


class RequestError(UgsepError, ValueError):
    """A scoring request does not match the bundle's feature spec or limits."""


class BackendUnavailableError(UgsepError, RuntimeError):
    """A backend (TensorRT, CUDA, ...) is not installed or cannot run on this machine."""


class InternalError(UgsepError, AssertionError):
    """A broken invariant inside ugsep: this is a bug, please report it."""


class TierUnavailableError(UgsepError, RuntimeError):
    """A remote embedding tier (Redis Cluster) cannot serve rows right now: a node is down or
    slow, or the pinned version is incomplete. Servers answer 503 naming the tier."""
