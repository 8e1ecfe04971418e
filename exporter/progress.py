"""Terminal output shared by the CLI and long-running steps (stderr, so stdout stays data)."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, highlight=False)
