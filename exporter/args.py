"""argparse types the export steps' options share (``add_arguments`` in each step module)."""

from __future__ import annotations

import argparse


def positive_int(value: str, expected: str = "an integer > 0") -> int:
    """An argparse ``type``: an int > 0, else a one-line usage error naming ``expected``."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return n
