"""Tables a push reads rows from: anything with a ``layout`` and ``raw_rows(start, stop)``.

``ArrayTable`` wraps numpy arrays (memory-mapped ones too, so a push streams a table
that does not fit in memory): float32 / float16 rows as they are, int8 rows as uint8
codes with a float32 scale and bias per row.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from runtime.errors import BundleError
from runtime.redis_tier.layout import TableLayout


class TableSource(Protocol):
    """A table to push: its layout and its stored rows as raw bytes."""

    layout: TableLayout

    def raw_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as ``uint8 [stop - start, layout.row_nbytes]``."""
        ...


class ArrayTable:
    """A table held in numpy arrays (or memmaps)."""

    def __init__(self, layout: TableLayout, values: np.ndarray, scale_bias: np.ndarray | None = None) -> None:
        self.layout = layout
        self._values = values
        self._scale_bias = scale_bias

    @classmethod
    def from_float(cls, name: str, values: np.ndarray) -> ArrayTable:
        """A float32 or float16 table ``[rows, dim]``, stored in its own dtype."""
        if values.ndim != 2 or values.dtype not in (np.float32, np.float16):
            raise BundleError(f"table '{name}': expected float32/float16 [rows, dim], got {values.dtype} {values.shape}")
        return cls(TableLayout(name, values.shape[0], values.shape[1], values.dtype.name), values)

    @classmethod
    def from_int8(cls, name: str, codes: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> ArrayTable:
        """A row-wise int8 table: uint8 codes ``[rows, dim]``, float32 scale and bias ``[rows]``."""
        n = codes.shape[0] if codes.ndim == 2 else -1
        if n < 0 or codes.dtype != np.uint8 or np.shape(scale) != (n,) or np.shape(bias) != (n,):
            raise BundleError(f"table '{name}': expected uint8 codes [rows, dim] and scale, bias [rows]")
        sb = np.stack([np.asarray(scale, np.float32).ravel(), np.asarray(bias, np.float32).ravel()], 1)
        return cls(TableLayout(name, codes.shape[0], codes.shape[1], "int8"), codes, sb)

    def raw_rows(self, start: int, stop: int) -> np.ndarray:
        block = np.ascontiguousarray(self._values[start:stop])
        raw = block.view(np.uint8).reshape(stop - start, -1)
        if self._scale_bias is None:
            return raw
        return np.concatenate([raw, self._scale_bias[start:stop].view(np.uint8).reshape(stop - start, 8)], 1)
