"""Read an ONNX file's graph signature without the ``onnx`` package and without its weights.

The structural checks on bundle load (runtime/bundle_checks.py) need each stage graph's
inputs and outputs (name, element type, dims), its nodes (op, inputs, outputs, integer
attributes) and its initializers' dims — never the weights themselves. This module
walks the protobuf wire format of ``ModelProto`` directly over a read-only ``mmap``:
an initializer's ``raw_data`` is skipped by its length, so its pages are never copied
into Python objects (only small tensors, such as an id-offset vector, keep their
values). The runtime stays free of ``onnx`` (Triton's Python environment has only numpy
and onnxruntime) and the weights are loaded once, by the backend.

Field numbers are those of onnx/onnx.proto3 (stable since IR version 3).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import BundleError

# TensorProto.DataType -> the spec's dtype names (others keep their number)
ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool",
              10: "float16", 11: "float64", 16: "bfloat16"}
_SMALL = 1 << 16  # tensors up to this many bytes keep their values (offsets, shapes)


@dataclass
class ValueInfo:
    """A graph input or output: name, element type name, dims (int, or str for symbolic)."""

    name: str
    dtype: str | None = None
    dims: list[int | str | None] | None = None  # None: no shape recorded


@dataclass
class Tensor:
    """An initializer (or a Constant's value): dims, data type, values if small."""

    name: str = ""
    dims: list[int] = field(default_factory=list)
    data_type: int = 0
    raw: bytes | None = None
    ints: list[int] = field(default_factory=list)  # int32_data / int64_data

    def int_values(self) -> list[int] | None:
        """The values of a small int32/int64 tensor (None when not available)."""
        if self.ints:
            return list(self.ints)
        if self.raw is not None and self.data_type in (6, 7):
            size, code = (4, "i") if self.data_type == 6 else (8, "q")
            return list(struct.unpack(f"<{len(self.raw) // size}{code}", self.raw))
        return None


@dataclass
class Node:
    """One node: op type, domain, input/output names, int and tensor attributes."""

    op_type: str = ""
    domain: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    ints: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class GraphInfo:
    """What the structural checks read from one ONNX file's main graph."""

    inputs: list[ValueInfo] = field(default_factory=list)
    outputs: list[ValueInfo] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    initializers: dict[str, Tensor] = field(default_factory=dict)


def read_graph(path: str | Path) -> GraphInfo:
    """The main graph's signature, nodes and initializer dims of the ONNX file ``path``."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                for num, _, val in _fields(view, 0, len(view)):
                    if num == 7:  # ModelProto.graph
                        return _graph(view, *val)
            finally:
                view.release()
    except (OSError, ValueError, TypeError, IndexError, struct.error) as e:  # malformed protobuf
        raise BundleError(f"'{path}' is not a readable ONNX model: {e}") from e
    raise BundleError(f"'{path}' is not an ONNX model: it has no graph")


# -- the protobuf wire format ---------------------------------------------------------------
def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or malformed varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf, start: int, end: int):
    """Yield (field number, wire type, value): an int, or (start, end) of a length-delimited span."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = struct.unpack_from("<q", buf, pos)[0], pos + 8
        elif wire == 5:
            val, pos = struct.unpack_from("<i", buf, pos)[0], pos + 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val, pos = (pos, pos + n), pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {num})")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield num, wire, val


def _str(buf, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _ints(buf, wire: int, val) -> list[int]:
    """A repeated int64/int32 field: one varint, or a packed span of them."""
    if wire == 0:
        return [_signed(val)]
    out, pos = [], val[0]
    while pos < val[1]:
        v, pos = _varint(buf, pos)
        out.append(_signed(v))
    return out


# -- ONNX messages ----------------------------------------------------------------------------
def _graph(buf, start: int, end: int) -> GraphInfo:
    g = GraphInfo()
    for num, _, val in _fields(buf, start, end):
        if num == 1:
            g.nodes.append(_node(buf, *val))
        elif num == 5:
            t = _tensor(buf, *val)
            g.initializers[t.name] = t
        elif num == 11:
            g.inputs.append(_value_info(buf, *val))
        elif num == 12:
            g.outputs.append(_value_info(buf, *val))
    initialized = set(g.initializers)  # IR < 4 lists initializers among the inputs too
    g.inputs = [i for i in g.inputs if i.name not in initialized]
    return g


def _node(buf, start: int, end: int) -> Node:
    n = Node()
    for num, _, val in _fields(buf, start, end):
        if num == 1:
            n.inputs.append(_str(buf, val))
        elif num == 2:
            n.outputs.append(_str(buf, val))
        elif num == 4:
            n.op_type = _str(buf, val)
        elif num == 7:
            n.domain = _str(buf, val)
        elif num == 5:
            _attribute(buf, *val, n)
    return n


def _attribute(buf, start: int, end: int, node: Node) -> None:
    name, i, t = "", None, None
    for num, wire, val in _fields(buf, start, end):
        if num == 1:
            name = _str(buf, val)
        elif num == 3 and wire == 0:
            i = _signed(val)
        elif num == 5 and wire == 2:
            t = _tensor(buf, *val)
    if i is not None:
        node.ints[name] = i
    if t is not None:
        node.tensors[name] = t


def _tensor(buf, start: int, end: int) -> Tensor:
    t = Tensor()
    for num, wire, val in _fields(buf, start, end):
        if num == 1:
            t.dims.extend(_ints(buf, wire, val))
        elif num == 2:
            t.data_type = val
        elif num == 8:
            t.name = _str(buf, val)
        elif num == 9 and val[1] - val[0] <= _SMALL:  # raw_data: only small ones are kept
            t.raw = bytes(buf[val[0]:val[1]])
        elif num in (5, 7) and len(t.ints) < _SMALL:  # int32_data / int64_data
            t.ints.extend(_ints(buf, wire, val))
    return t


def _value_info(buf, start: int, end: int) -> ValueInfo:
    v = ValueInfo(name="")
    for num, _, val in _fields(buf, start, end):
        if num == 1:
            v.name = _str(buf, val)
        elif num == 2:
            for tnum, _, tval in _fields(buf, *val):
                if tnum == 1:  # TypeProto.tensor_type
                    _tensor_type(buf, *tval, v)
    return v


def _tensor_type(buf, start: int, end: int, v: ValueInfo) -> None:
    for num, _, val in _fields(buf, start, end):
        if num == 1:
            v.dtype = ELEM_TYPES.get(val, str(val))
        elif num == 2:  # TensorShapeProto
            v.dims = [_dim(buf, *d) for n, _, d in _fields(buf, *val) if n == 1]


def _dim(buf, start: int, end: int) -> int | str | None:
    for num, wire, val in _fields(buf, start, end):
        if num == 1 and wire == 0:
            return _signed(val)
        if num == 2:
            return _str(buf, val)
    return None
