"""Capture with torch.export: one graph, a dynamic batch dimension on every input."""

from __future__ import annotations

import linecache
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from exporter.errors import ExportError
from runtime.sample import sample_rows
from runtime.spec import FeatureSpec

if TYPE_CHECKING:
    from exporter.pipeline import ExportContext

log = logging.getLogger(__name__)
MAX_BATCH = 1 << 20
EXAMPLE_BATCH = 3  # > 1, so export does not specialise the batch size to 1


def to_torch_inputs(spec: FeatureSpec, rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """Arrays keyed by spec name -> ``forward`` kwargs (``arg.key`` leaves regrouped in dicts)."""
    kwargs: dict[str, Any] = {}
    for s in spec.inputs:
        if s.name not in rows:
            raise ExportError(f"input '{s.name}' of spec '{spec.name}' is missing from the rows")
        t = torch.from_numpy(np.ascontiguousarray(rows[s.name]))
        if s.key is None:
            kwargs[s.arg] = t
        else:
            kwargs.setdefault(s.arg, {})[s.key] = t
    return kwargs


def flat_input_names(spec: FeatureSpec, kwargs: dict[str, Any]) -> list[str]:
    """Spec names in the order torch.export flattens ``kwargs`` (the ONNX input order)."""
    leaves, _ = pytree.tree_flatten_with_path(kwargs)
    names = []
    for path, _leaf in leaves:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        names.append(".".join(str(k) for k in keys))
    unknown = sorted(set(names) - {s.name for s in spec.inputs})
    if unknown:
        raise ExportError(f"flattened inputs {unknown} have no entry in spec '{spec.name}'")
    return names


def dynamic_shapes(spec: FeatureSpec, batch: torch.export.Dim | None = None) -> dict[str, Any]:
    """dim 0 of every input is the one shared batch symbol."""
    batch = batch or torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shapes: dict[str, Any] = {}
    for s in spec.inputs:
        if s.key is None:
            shapes[s.arg] = {0: batch}
        else:
            shapes.setdefault(s.arg, {})[s.key] = {0: batch}
    return shapes


def example_rows(
    spec: FeatureSpec, n: int, seed: int, rows: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """``n`` example rows: the first rows of the user's data when given, else sampled.

    Real rows matter: a model indexing embeddings with float-coded id columns only runs
    on ids within each column's vocabulary.
    """
    if rows is not None and all(len(rows.get(s.name, ())) >= n for s in spec.inputs):
        return {s.name: np.asarray(rows[s.name][:n]).astype(s.dtype) for s in spec.inputs}
    return sample_rows(spec, n, seed)


def capture(
    model: torch.nn.Module,
    spec: FeatureSpec,
    *,
    seed: int = 0,
    rows: dict[str, np.ndarray] | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export`` the model with a dynamic batch on every input, named as in the spec.

    ``rows`` (spec-named arrays, e.g. the ``--data`` file) supply the example inputs.
    """
    model = model.eval()
    kwargs = to_torch_inputs(spec, example_rows(spec, EXAMPLE_BATCH, seed, rows))
    try:
        with torch.no_grad():
            model(**kwargs)
    except Exception as e:  # noqa: BLE001 - tell the user the spec and model disagree
        raise ExportError(
            f"the model does not run on inputs built from spec '{spec.name}' "
            f"({', '.join(s.name for s in spec.inputs)}): {type(e).__name__}: {e}"
        ) from e
    try:
        ep = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes(spec), strict=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(
            f"torch.export could not capture '{spec.name}' with a dynamic batch dimension: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{failure_site(str(e))}. "
            "Models whose forward branches on data or on the batch size need fixing before export"
        ) from e
    return ep


_CAUSED_BY = re.compile(r"Caused by: \((?P<file>[^\s:]+):(?P<line>\d+) in (?P<fn>\w+)\)")


def failure_site(message: str) -> str:
    """' at file:line in fn (`code`)': the construct torch.export names as the cause.

    A data-dependent guard ("Could not guard on data-dependent expression") says which
    line of the model's forward triggered it; the code on that line is the construct
    (a branch on a data-dependent size, a boolean-mask gather) to rewrite.
    """
    m = _CAUSED_BY.search(message)
    if m is None:
        return ""
    code = ""
    for path in (m["file"], str(Path.cwd() / m["file"])):
        code = linecache.getline(path, int(m["line"])).strip()
        if code:
            break
    where = f" at {Path(m['file']).name}:{m['line']} in {m['fn']}"
    return where + (f" (`{code}`)" if code else "")


# ---- pipeline steps (exporter.pipeline) ---------------------------------------------------


def step_capture(ctx: ExportContext) -> None:
    """Pipeline step ``capture``: torch.export with a dynamic batch dim on every input."""
    spec = ctx.spec
    if ctx.loaded.program is not None:  # a .pt2 archive is already captured (exporter.program)
        ctx.program = ctx.loaded.program
    else:
        ctx.program = capture(ctx.loaded.eager(), spec, seed=ctx.options.seed, rows=ctx.options.data)
    ctx.input_names = flat_input_names(spec, to_torch_inputs(spec, sample_rows(spec, 1)))


def step_full_onnx(ctx: ExportContext) -> None:
    """The unsplit model as full.onnx: the baseline, and the fallback."""
    from exporter.steps.onnx_build import export_onnx

    ctx.stages["full"] = export_onnx(ctx.program, ctx.input_names, list(ctx.spec.outputs))
