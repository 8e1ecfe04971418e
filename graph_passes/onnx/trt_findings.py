"""Findings of the TensorRT readiness check, and where in the model code a node came from."""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    """One reason TensorRT would refuse (error) or silently alter (warning) a graph."""

    severity: str
    rule: str
    node: str
    op_type: str
    message: str
    fix: str = ""
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.op_type} '{self.node}'" if self.op_type else self.node
        text = f"[{self.severity}] {self.rule}: {where}: {self.message}"
        if self.source:
            text += f"\n    produced by: {self.source}"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


def finding(node: ir.Node, severity: str, rule: str, message: str, fix: str) -> Finding:
    name = node.name or (node.outputs[0].name if node.outputs else node.op_type)
    return Finding(severity, rule, name, node.op_type, message, fix, producing_code(node))


def producing_code(node: ir.Node) -> str:
    """Where a node came from: module path and user source line (torch.onnx metadata),
    or the ugsep pass that created it."""
    meta = node.metadata_props
    parts = []
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = [s for s in ast.literal_eval(scopes) if s]
        except (ValueError, SyntaxError):
            names = [scopes]
        # the last scope is the FX node itself; the ones before it are the module path
        module = ".".join(names[:-1]) or "<top-level forward>"
        parts.append(f"module {module} (op {names[-1] if names else '?'})")
    elif meta.get("namespace"):
        parts.append(meta["namespace"])
    frame = _user_frame(meta.get("pkg.torch.onnx.stack_trace", ""))
    if frame:
        parts.append(frame)
    if meta.get("ugsep.pass"):
        parts.append(f"created by ugsep pass {meta['ugsep.pass']}")
    return "; ".join(parts)


def _user_frame(stack: str) -> str:
    """The innermost frame of ``stack`` outside torch itself: 'file:line in fn: code'."""
    lines = stack.splitlines()
    frames = []
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("File "):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append((s, code))
    user = [f for f in frames if "/torch/" not in f[0]] or frames
    if not user:
        return ""
    head, code = user[-1]
    head = head.replace("File ", "", 1).replace('", line ', ":").replace('"', "")
    return f"{head}: {code}" if code else head


def is_const(value: ir.Value | None) -> bool:
    return const(value) is not None


def const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()
