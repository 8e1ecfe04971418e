"""Seeded tables in the three stored dtypes, and their rows computed independently of ugsep."""

from __future__ import annotations

import numpy as np

from runtime.redis_tier import ArrayTable


def make_arrays(seed: int = 0, rows: int = 5000, dim: int = 16) -> dict[str, tuple]:
    """name -> arrays: float32 values, float16 values, (uint8 codes, scale, bias)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (rows, dim), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.1, rows).astype(np.float32)
    bias = rng.uniform(-1, 1, rows).astype(np.float32)
    return {
        "user_f32": (rng.standard_normal((rows, dim)).astype(np.float32),),
        "item_f16": (rng.standard_normal((rows // 2, dim * 2)).astype(np.float16),),
        "item_i8": (codes, scale, bias),
    }


def make_tables(arrays: dict[str, tuple]) -> list[ArrayTable]:
    return [ArrayTable.from_int8(n, *a) if len(a) == 3 else ArrayTable.from_float(n, a[0]) for n, a in arrays.items()]


def expected_rows(arrays: dict[str, tuple], name: str, ids: np.ndarray) -> np.ndarray:
    """float32 rows the tier must return, by plain numpy (int8: code * scale + bias)."""
    a = arrays[name]
    if len(a) == 1:
        return a[0][ids].astype(np.float32)
    codes, scale, bias = a
    return codes[ids].astype(np.float32) * scale[ids][..., None] + bias[ids][..., None]


def expected_raw(arrays: dict[str, tuple], name: str, ids: np.ndarray) -> np.ndarray:
    """The stored bytes of the rows: values as they are; int8 codes then scale then bias."""
    a = arrays[name]
    if len(a) == 1:
        return a[0][ids].view(np.uint8)
    codes, scale, bias = a
    return np.concatenate([codes[ids], scale[ids][..., None].view(np.uint8), bias[ids][..., None].view(np.uint8)], -1)
