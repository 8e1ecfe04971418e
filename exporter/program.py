"""``.pt2`` archives: an ExportedProgram is already captured, so it is checked, not re-captured.

``torch.export.save`` writes a program whose inputs are fixed: names, dtypes, shapes and
which dims are dynamic. The spec must describe exactly those inputs (one-line error
otherwise), and dim 0 must be dynamic or the bundle could only score a fixed batch.
The eager reference of a program is :class:`ProgramModule`: ``program.module()`` refuses
``.eval()``/``.train()``, and every caller of a reference model calls ``.eval()``.
"""

from __future__ import annotations

from typing import Any

import torch

from exporter.errors import ExportError
from graph_passes.fx._base import sym_expr, tensor_val, user_input_names
from runtime.spec import FeatureSpec


class ProgramModule(torch.nn.Module):
    """An eager reference that runs an ExportedProgram (``.eval()`` is a no-op for it)."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program  # reused by parity (split-eager): never re-captured
        # a plain attribute, not a submodule: program.module() raises on .train()/.eval()
        object.__setattr__(self, "_run", program.module())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)


def check_program(program: torch.export.ExportedProgram, spec: FeatureSpec, where: str) -> None:
    """Refuse a program whose inputs disagree with ``spec``, in one line naming the input."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    names = user_input_names(program)
    got = {spec_name: placeholders[ph] for ph, spec_name in names.items()}
    declared = [s.name for s in spec.inputs]
    if set(got) != set(declared):
        raise ExportError(
            f"'{where}' takes inputs {sorted(got)} but spec '{spec.name}' declares "
            f"{sorted(declared)}; write the spec for the program's own inputs"
        )
    for s in spec.inputs:
        _check_input(s, tensor_val(got[s.name]), where)


def _check_input(s, val: torch.Tensor | None, where: str) -> None:
    if val is None:
        raise ExportError(f"'{where}': input '{s.name}' is not a tensor; the spec says {s.dtype}")
    dtype = str(val.dtype).replace("torch.", "")
    if dtype != s.dtype:
        raise ExportError(f"'{where}': input '{s.name}' has dtype {dtype}; the spec says {s.dtype}")
    shape = [str(sym_expr(d)) for d in val.shape]
    if tuple(shape[1:]) != tuple(str(d) for d in s.shape):
        raise ExportError(
            f"'{where}': input '{s.name}' has shape {shape}; the spec says "
            f"[batch, {', '.join(map(str, s.shape))}]"
        )
    if val.dim() == 0 or not isinstance(val.shape[0], torch.SymInt):
        raise ExportError(
            f"'{where}': input '{s.name}' has a static batch dim ({shape[0] if shape else 'none'}); "
            "save the program with a dynamic dim 0 (dynamic_shapes={..: {0: torch.export.Dim('batch')}})"
        )
