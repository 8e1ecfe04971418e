"""ExportedProgram -> ONNX, with graph inputs and outputs named as the spec names them."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import onnx
import onnx_ir as ir
import torch

from exporter.errors import ExportError

log = logging.getLogger(__name__)
OPSET = 18
PROTOBUF_LIMIT = (1 << 31) - 1  # onnx.checker refuses in-memory protos of 2 GiB and more


def export_onnx(
    program: torch.export.ExportedProgram,
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    batch_dims: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Convert a captured program to ONNX and rename its I/O.

    ``input_names`` are the program's user inputs in flattened order (the ONNX input
    order); ``batch_dims`` maps an input or output name to the name its symbolic dim 0
    gets (default ``batch`` for all).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(
                program, (), dynamo=True, opset_version=OPSET, verbose=False, optimize=True
            )
        except Exception as e:  # noqa: BLE001
            raise ExportError(
                f"torch.onnx could not convert the captured graph: {type(e).__name__}: {e}"
            ) from e
    model = onnx_program.model
    rename_io(model, input_names, output_names, batch_dims or {})
    proto = ir.serde.serialize_model(model)
    if proto.ByteSize() < PROTOBUF_LIMIT:  # larger: checked on the file (external data)
        onnx.checker.check_model(proto)
    return proto


def rename_io(
    model: ir.Model,
    input_names: Sequence[str],
    output_names: Sequence[str],
    batch_dims: dict[str, str],
) -> None:
    """Give graph inputs/outputs their contract names and dim 0 a readable symbol."""
    g = model.graph
    if len(g.inputs) != len(input_names):
        raise ExportError(
            f"the ONNX graph has {len(g.inputs)} inputs ({[v.name for v in g.inputs]}) "
            f"but {len(input_names)} names were given ({list(input_names)})"
        )
    if len(g.outputs) != len(output_names):
        raise ExportError(
            f"the model returns {len(g.outputs)} output(s) but the spec names "
            f"{len(output_names)} ({list(output_names)}); fix the spec's 'outputs'"
        )
    symbols: dict[str, str] = {}
    for value, name in zip(g.inputs, input_names, strict=True):
        value.name = name
        _rename_dim0(value, batch_dims.get(name, "batch"), symbols)
    for value, name in zip(g.outputs, output_names, strict=True):
        value.name = name
        _rename_dim0(value, batch_dims.get(name, "batch"), symbols)


def _rename_dim0(value: ir.Value, new: str, symbols: dict[str, str]) -> None:
    shape = value.shape
    if shape is None or len(shape) == 0:
        return
    d0 = shape[0]
    if isinstance(d0, ir.SymbolicDim) and d0.value is not None:
        symbols.setdefault(d0.value, new)
        dims = list(shape)
        dims[0] = ir.SymbolicDim(symbols[d0.value])
        value.shape = ir.Shape(dims)
