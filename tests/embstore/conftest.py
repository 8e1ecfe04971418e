"""Fixtures shared with the Triton tests."""

from __future__ import annotations

from tests.triton.conftest import triton_env  # noqa: F401 (a fixture)
