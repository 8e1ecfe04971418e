"""Held-out data files for parity and calibration.

Layout (``.npz``, written by ``numpy.savez``): one array per spec input, named exactly
as the spec names it (``user_ids``, ``user.ids`` …), batch first; optional ``label``
(0/1) and ``request_id`` (int, equal for rows of one request: one user, its candidates).
A dict-leaf input (``user.ids``, the argument ``user``'s key ``ids``) may also be
stored under its flat name ``user_ids``, as the students' data generator names it.
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
        names = _columns(s.name, s.shape)
        if any(n not in col for n in names):
            names = _columns(_flat(s.name), s.shape) if s.name != _flat(s.name) else names
        missing = [n for n in names if n not in col]
        if missing:
            raise ExportError(
                f"data file '{path}' lacks column(s) {missing[:4]} for input '{s.name}' "
                f"(header starts {header[:6]})"
            )
        block = table[:, [col[n] for n in names]].astype(np.float64)
        rows[s.name] = block.reshape(-1, *s.shape).astype(s.dtype)
    for extra in ("label", "request_id"):
        if extra in col:
            rows[extra] = (
                table[:, col[extra]]
                .astype(np.float64)
                .astype(np.float32 if extra == "label" else np.int64)
            )
    return rows


def _columns(name: str, shape: tuple[int, ...]) -> list[str]:
    width = int(np.prod(shape)) if shape else 1
    return [name] if not shape else [f"{name}[{i}]" for i in range(width)]


def _flat(name: str) -> str:
    return name.replace(".", "_").replace("/", "_")


def _match_names(
    rows: dict[str, np.ndarray], spec: FeatureSpec, path: Path
) -> dict[str, np.ndarray]:
    """Rename arrays stored under an input's flat name (``user_ids``) to the spec's (``user.ids``)."""
    by_flat: dict[str, list[str]] = {}
    for k in rows:
        by_flat.setdefault(_flat(k), []).append(k)
    out = dict(rows)
    missing = []
    for s in spec.inputs:
        if s.name in rows:
            continue
        found = [k for k in by_flat.get(_flat(s.name), []) if k not in RESERVED]
        if len(found) == 1:
            out[s.name] = out.pop(found[0])
        elif len(found) > 1:
            raise ExportError(
                f"data file '{path}': input '{s.name}' is ambiguous, arrays {found} all match it; "
                f"keep one, named '{s.name}'"
            )
        else:
            missing.append(s.name)
    if missing:
        known = sorted(k for k in rows if k not in RESERVED)
        raise ExportError(
            f"data file '{path}' has no array for input(s) {missing} of spec '{spec.name}' "
            f"(it has {known}); name each array as the spec's input "
            f"(or its flat form, e.g. '{_flat(missing[0])}')"
        )
    return out


def _check(rows: dict[str, np.ndarray], spec: FeatureSpec, path: Path) -> dict[str, np.ndarray]:
    rows = _match_names(rows, spec, path)
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
