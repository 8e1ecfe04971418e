"""Shared vocabulary of the FX passes: results, provenance, the batch symbol, input names."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx
from torch.utils import _pytree as pytree

from graph_passes.onnx.errors import PassError

log = logging.getLogger(__name__)

PASS_KEY = "ugsep.pass"
"""node.meta key every node created by a ugsep FX pass carries (value: the pass name)."""
SIDE_KEY = "ugsep.side"
FLOPS_KEY = "ugsep.flops"
BATCH_KEY = "ugsep.batch"  # (outer, inner): batch dim size = outer * B * inner
SIDES = ("user", "group", "const", "shape")


@dataclass
class PassResult:
    """What an FX pass returns: the (possibly new) graph module and whether it changed."""

    graph_module: Any
    modified: bool
    facts: dict[str, Any] = field(default_factory=dict)


def graph_module_of(gm_or_ep: Any) -> fx.GraphModule:
    """The GraphModule of an ExportedProgram (lifted params) or a GraphModule itself."""
    if isinstance(gm_or_ep, torch.export.ExportedProgram):
        return gm_or_ep.graph_module
    if isinstance(gm_or_ep, fx.GraphModule):
        return gm_or_ep
    raise PassError(f"expected an ExportedProgram or fx.GraphModule, got {type(gm_or_ep).__name__}")


def tensor_val(node: Any) -> torch.Tensor | None:
    """The fake tensor torch.export recorded for ``node`` (None for non-tensors)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def sym_expr(d: Any) -> sympy.Expr:
    """A (Sym)Int dimension as a sympy expression."""
    if isinstance(d, torch.SymInt):
        return d.node.expr
    return sympy.Integer(int(d))


def batch_symbol(ep: torch.export.ExportedProgram, placeholder_names: list[str]) -> sympy.Symbol:
    """The one symbol torch.export gave dim 0 of the model inputs."""
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for name in placeholder_names:
        val = tensor_val(nodes[name])
        if val is not None and val.dim() > 0:
            expr = sym_expr(val.shape[0])
            if isinstance(expr, sympy.Symbol):
                return expr
    raise PassError(
        "no model input has a symbolic batch dimension 0; capture the model with a dynamic "
        "batch (exporter.steps.capture.capture) before splitting"
    )


def batch_factor(d: Any, s0: sympy.Symbol) -> int | None:
    """c when the dimension is c*s0 (c a positive int), else None."""
    expr = sym_expr(d)
    if s0 not in expr.free_symbols:
        return None
    c = sympy.simplify(expr / s0)
    return int(c) if c.is_Integer and int(c) > 0 else None


def batch_dims(val: torch.Tensor, s0: sympy.Symbol) -> list[int]:
    """Dims of ``val`` whose size involves the batch symbol."""
    return [i for i, d in enumerate(val.shape) if s0 in sym_expr(d).free_symbols]


def per_row(expr: Any, s0: sympy.Symbol) -> int:
    """A count that grows with the batch, evaluated at batch size 1."""
    e = sym_expr(expr) if not isinstance(expr, sympy.Basic) else expr
    return int(e.subs(s0, 1))


def user_input_names(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """Placeholder name -> spec name (``arg`` or ``arg.key``) for the model's own inputs."""
    sig = ep.graph_signature
    placeholders = list(sig.user_inputs)
    n = len(placeholders)
    tree = pytree.tree_unflatten(list(range(n)), ep.call_spec.in_spec)
    leaves, _ = pytree.tree_flatten_with_path(tree)
    out = {}
    for path, idx in leaves:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if keys and keys[0] in (0, 1) and len(keys) > 1:  # (args, kwargs) wrapper
            keys = keys[1:]
        out[placeholders[idx]] = ".".join(str(k) for k in keys)
    return out


def state_of(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> tensor value for parameters, buffers and lifted constants."""
    sig = ep.graph_signature
    out: dict[str, torch.Tensor] = {}
    for ph, fqn in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items():
        out[ph] = ep.state_dict[fqn] if fqn in ep.state_dict else ep.constants[fqn]
    for ph, fqn in sig.inputs_to_lifted_tensor_constants.items():
        out[ph] = ep.constants[fqn]
    return out


def fqn_of(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """Placeholder name -> fully qualified state name (``encoder.0.weight``)."""
    sig = ep.graph_signature
    return {
        **sig.inputs_to_parameters,
        **sig.inputs_to_buffers,
        **sig.inputs_to_lifted_tensor_constants,
    }


def module_path(node: fx.Node) -> str:
    """The nn module path torch.export recorded for ``node`` ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return str(path).replace("L['self'].", "").replace("L['self']", "")


def source_line(node: fx.Node) -> str:
    """The innermost user-code frame of ``node``'s stack trace ('file:line in fn: code')."""
    lines = [ln.rstrip() for ln in (node.meta.get("stack_trace") or "").splitlines()]
    frames = [i for i, ln in enumerate(lines) if ln.strip().startswith("File ")]
    if not frames:
        return ""
    i = frames[-1]
    code = lines[i + 1].strip() if i + 1 < len(lines) else ""
    return f"{lines[i].strip()}: {code}" if code else lines[i].strip()


def op_name(node: fx.Node) -> str:
    t = node.target
    return (
        str(t.name()) if hasattr(t, "name") and callable(t.name) else getattr(t, "__name__", str(t))
    )
