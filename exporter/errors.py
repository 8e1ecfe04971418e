"""The exporter's error family."""

from __future__ import annotations

from runtime.errors import InternalError, UgsepError


class ExportError(UgsepError):
    """A checkpoint, spec or model cannot be exported as asked; the message says why."""


class CheckpointError(ExportError):
    """A checkpoint is missing, corrupt, or not what it claims to be."""


__all__ = ["ExportError", "CheckpointError", "InternalError"]
