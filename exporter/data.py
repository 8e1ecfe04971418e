"""Held-out data files for parity and calibration.

Layout (``.npz``, written by ``numpy.savez``): one array per spec input, named exactly
as the spec names it (``user_ids``, ``user.ids`` …), batch first; optional ``label``
(0/1) and ``request_id`` (int, equal for rows of one request: one user, its candidates).
``.csv``: a header row; a scalar-per-row input is one column named as the input, a
vector input of width K is K columns ``name[0]`` … ``name[K-1]``; ``label`` and
``request_id`` as plain columns.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from exporter.errors import ExportError
from runtime.spec import FeatureSpec

RESERVED = ("label", "request_id", "prob")


def load_rows(path: str | Path, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Read a data file and check it against the spec; returns arrays by name."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"data file '{path}' does not exist")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                rows = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise ExportError(f"cannot read '{path}' as a numpy .npz archive: {e}") from e
    elif path.suffix == ".csv":
        rows = _read_csv(path, spec)
    else:
        raise ExportError(f"data file '{path}': use .npz or .csv (see `ugsep check --help`)")
    return _check(rows, spec, path)


def _read_csv(path: Path, spec: FeatureSpec) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ExportError(f"data file '{path}' is empty")
        table = np.array(list(reader), dtype=object)
    col = {h: i for i, h in enumerate(header)}
    rows: dict[str, np.ndarray] = {}
    for s in spec.inputs:
        width = int(np.prod(s.shape)) if s.shape else 1
        names = [s.name] if not s.shape else [f"{s.name}[{i}]" for i in range(width)]
        missing = [n for n in names if n not in col]
        if missing:
            raise ExportError(f"data file '{path}' lacks column(s) {missing[:4]} for input '{s.name}'")
        block = table[:, [col[n] for n in names]].astype(np.float64)
        rows[s.name] = block.reshape(-1, *s.shape).astype(s.dtype)
    for extra in ("label", "request_id"):
        if extra in col:
            rows[extra] = table[:, col[extra]].astype(np.float64).astype(
                np.float32 if extra == "label" else np.int64
            )
    return rows


def _check(rows: dict[str, np.ndarray], spec: FeatureSpec, path: Path) -> dict[str, np.ndarray]:
    missing = [s.name for s in spec.inputs if s.name not in rows]
    if missing:
        raise ExportError(f"data file '{path}' has no array for input(s) {missing}")
    n = len(rows[spec.inputs[0].name])
    for s in spec.inputs:
        a = rows[s.name]
        if tuple(a.shape[1:]) != s.shape or len(a) != n:
            raise ExportError(
                f"data file '{path}': '{s.name}' has shape {list(a.shape)}, "
                f"expected [{n}, {', '.join(map(str, s.shape))}]"
            )
        if a.dtype != np.dtype(s.dtype):
            rows[s.name] = a.astype(s.dtype)
    for k in ("label", "request_id"):
        if k in rows and len(rows[k]) != n:
            raise ExportError(f"data file '{path}': '{k}' has {len(rows[k])} rows, inputs have {n}")
    return {k: v for k, v in rows.items() if k in RESERVED or k in {s.name for s in spec.inputs}}
