"""Terminal output shared by the CLI and long-running steps (stderr, so stdout stays data)."""

from __future__ import annotations

import os

from rich.console import Console

# Piped output (CI logs, `| tee`) gets 120 columns rather than rich's 80, so the parity
# and results tables stay readable; a terminal keeps its own width; $COLUMNS wins.
_width = None if os.environ.get("COLUMNS") else (None if os.isatty(2) else 120)
console = Console(stderr=True, highlight=False, width=_width)
