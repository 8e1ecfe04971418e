"""The graph passes' error family."""

from __future__ import annotations


class PassError(RuntimeError):
    """A graph cannot be transformed as asked; the message names the node and why."""


__all__ = ["PassError"]
