"""The graph passes' error family.

``PassError`` is a ``UgsepError`` (runtime.errors, which imports nothing), so a pass that
refuses a graph reaches the CLI's error contract: one line, exit 2.
"""

from __future__ import annotations

from runtime.errors import UgsepError


class PassError(UgsepError, RuntimeError):
    """A graph cannot be transformed as asked; the message names the node and why."""


__all__ = ["PassError"]
