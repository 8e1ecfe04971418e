"""Planting faults in a bundle's ONNX graphs (then re-hashing it, so only parity can tell).

Each planter edits one ONNX file of a bundle directory the way a real bug would and
rewrites its sha256 in the manifest, so the bundle still verifies and the fault has
to be caught by parity, not by the integrity check.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.bundle import sha256_file
from runtime.manifest import MANIFEST_NAME, Manifest


def rehash(bundle_dir, rel: str, **fields) -> None:
    m = Manifest.read(bundle_dir)
    p = bundle_dir / rel
    m.files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    for k, v in fields.items():
        setattr(m, k, v)
    (bundle_dir / MANIFEST_NAME).write_text(m.dumps())


def _node_of_module(model: onnx.ModelProto, module: str, op_type: str) -> onnx.NodeProto:
    """The ONNX node of ``op_type`` that torch.onnx lowered from module path ``module``."""
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = props.get("pkg.torch.onnx.name_scopes", "")
        if node.op_type == op_type and f"'{module}'" in scopes:
            return node
    raise AssertionError(f"no {op_type} node from module '{module}'")


def _weight_of(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.TensorProto:
    inits = {t.name: t for t in model.graph.initializer}
    for name in node.input:
        if name in inits and len(inits[name].dims) == 2:
            return inits[name]
    raise AssertionError(f"node {node.name} has no 2-D weight initializer")


def scale_weight(bundle_dir, rel: str, module: str, factor: float, op_type: str = "Gemm") -> None:
    """Multiply the weight of the layer at ``module`` by ``factor``."""
    path = bundle_dir / rel
    model = onnx.load(str(path))
    w = _weight_of(model, _node_of_module(model, module, op_type))
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(factor), w.name))
    onnx.save(model, str(path))
    rehash(bundle_dir, rel)


def swap_inputs(bundle_dir, rel: str, a: str, b: str) -> None:
    """Swap the names of two graph inputs (a boundary wired to the wrong tensor)."""
    path = bundle_dir / rel
    model = onnx.load(str(path))
    tmp = "__swap__"
    for node in model.graph.node:
        node.input[:] = [tmp if i == a else a if i == b else i for i in node.input]
        node.input[:] = [b if i == tmp else i for i in node.input]
    onnx.save(model, str(path))
    rehash(bundle_dir, rel)


def transpose_input(bundle_dir, rel: str, name: str, perm: list[int]) -> None:
    """Make every consumer of graph input ``name`` read it transposed by ``perm``."""
    path = bundle_dir / rel
    model = onnx.load(str(path))
    moved = f"{name}__transposed"
    for node in model.graph.node:
        node.input[:] = [moved if i == name else i for i in node.input]
    model.graph.node.insert(0, helper.make_node("Transpose", [name], [moved], perm=perm))
    onnx.save(model, str(path))
    rehash(bundle_dir, rel)


def quantize_weight(
    bundle_dir, rel: str, module: str, scale_error: float = 1.0, op_type: str = "Gemm"
) -> None:
    """Replace a layer's weight by int8 + DequantizeLinear (per output channel).

    ``scale_error`` multiplies the stored scales: 1.0 is a correct quantization, anything
    else is the planted fault of a wrong quantization scale.
    """
    path = bundle_dir / rel
    model = onnx.load(str(path))
    node = _node_of_module(model, module, op_type)
    w_init = _weight_of(model, node)
    w = numpy_helper.to_array(w_init)
    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    axis = 0 if trans_b else 1  # the output-channel axis of the stored weight
    amax = np.max(np.abs(w), axis=1 - axis)
    scale = (np.maximum(amax, 1e-8) / 127.0).astype(np.float32)
    q = np.clip(np.round(w / np.expand_dims(scale, 1 - axis)), -127, 127).astype(np.int8)
    qn, sn, dq = f"{w_init.name}_q", f"{w_init.name}_scale", f"{w_init.name}_dq"
    model.graph.initializer.remove(w_init)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(q, qn),
            numpy_helper.from_array(scale * np.float32(scale_error), sn),
        ]
    )
    node.input[:] = [dq if i == w_init.name else i for i in node.input]
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", [qn, sn], [dq], axis=axis))
    onnx.save(model, str(path))
    rehash(bundle_dir, rel)
