"""Small helpers shared by the ONNX passes: constants, provenance tags, refusals."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)

PASS_KEY = "ugsep.pass"
"""metadata_props key every node created by a ugsep pass carries (value: the pass name)."""


@dataclass(frozen=True)
class Refusal:
    """A node a pass looked at and left alone, and why ("weight is not a constant")."""

    node: str
    op_type: str
    reason: str


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or Constant-node output, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return tensor.numpy()


def tag(node: ir.Node, pass_name: str, **facts: str) -> ir.Node:
    """Record on ``node`` which pass made it (and any extra facts), for tracing back errors."""
    node.metadata_props[PASS_KEY] = pass_name
    for key, val in facts.items():
        node.metadata_props[f"ugsep.{key}"] = str(val)
    return node


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer with a name unique in ``graph``."""
    taken = graph.initializers
    unique, i = name, 0
    while unique in taken:
        i += 1
        unique = f"{name}_{i}"
    value = ir.Value(name=unique, const_value=ir.Tensor(array, name=unique))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    return value


def node_name(node: ir.Node) -> str:
    """A readable identity for messages: the node's name, else its first output's name."""
    return node.name or (node.outputs[0].name if node.outputs else "") or node.op_type


def is_float32(value: ir.Value) -> bool:
    return value.dtype == ir.DataType.FLOAT


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.graph.opset_imports.get("", 0))


# Ops whose semantics changed between opset 18 and 21; bumping the import for them is unsafe.
_CHANGED_BY_21 = {"DFT", "GridSample", "GroupNormalization"}


def require_opset(model: ir.Model, version: int, why: str) -> None:
    """Raise the default-domain opset to ``version`` (block-wise / int4 DequantizeLinear needs 21).

    Only ops whose meaning is unchanged across the bump are allowed; anything else is refused.
    """
    from graph_passes.onnx.errors import PassError

    if default_opset(model) >= version:
        return
    changed = sorted(
        {n.op_type for n in model.graph.all_nodes() if n.domain == ""} & _CHANGED_BY_21
    )
    if changed:
        raise PassError(
            f"{why} needs opset {version} but the graph uses {changed}, whose semantics change "
            f"from opset {default_opset(model)}; export with opset {version} or use per-channel int8"
        )
    model.opset_imports[""] = version
    model.graph.opset_imports[""] = version
