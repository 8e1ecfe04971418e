"""KServe v2 / Open Inference Protocol codec: JSON tensors and the binary data extension.

A request body is a JSON header, optionally followed by raw tensor bytes; the
``Inference-Header-Content-Length`` HTTP header then gives the JSON length, and each
binary input carries ``"parameters": {"binary_data_size": bytes}`` (inputs' bytes are
laid out in the order the inputs are listed). Outputs are returned as binary when the
output asks for ``"binary_data": true`` or the request for ``"binary_data_output": true``
(what ``tritonclient.http`` sends). Every problem is a ``RequestError`` naming the input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.errors import RequestError
from runtime.serving.bounds import ParseLimits, check_header_bytes, check_shape

HEADER_LENGTH = "Inference-Header-Content-Length"
# numpy dtype name <-> KServe v2 datatype name
DATATYPES = {
    "bool": "BOOL", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
NUMPY_OF = {v: np.dtype(k) for k, v in DATATYPES.items()}


def kserve_datatype(dtype: str | np.dtype) -> str:
    """The KServe datatype name for a numpy dtype (``float32`` -> ``FP32``)."""
    return DATATYPES[np.dtype(dtype).name]


@dataclass
class InferRequest:
    """A decoded infer request: tensors by name, requested outputs, parameters."""

    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]] | None  # (name, binary) or None for "all outputs"
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    binary_output: bool = False


def parse_infer(body: bytes, header_length: str | None, limits: ParseLimits | None = None) -> InferRequest:
    """Decode a request body (JSON, or JSON + binary tensors), bounded by ``limits``."""
    limits = limits or ParseLimits()
    json_len = _header_length(header_length, len(body))
    check_header_bytes(memoryview(body)[:json_len], limits)
    try:
        head = json.loads(body[:json_len])
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: ints past the digit limit
        raise RequestError(f"the request body is not valid JSON: {str(e)[:200]}") from e
    if not isinstance(head, dict):
        raise RequestError("the request body must be a JSON object with an 'inputs' list")
    params = _mapping(head.get("parameters"), "request 'parameters'")
    raw_inputs = head.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError("the request needs a non-empty 'inputs' list")
    binary, offset, inputs = memoryview(body)[json_len:], 0, {}
    for i, raw in enumerate(raw_inputs):
        name, arr, used = _parse_input(i, raw, binary, offset, limits)
        if name in inputs:
            raise RequestError(f"input '{name}' appears more than once in the request")
        inputs[name], offset = arr, offset + used
    if offset != len(binary):
        raise RequestError(
            f"the request carries {len(binary)} bytes of binary tensor data but its inputs' "
            f"'binary_data_size' parameters add up to {offset}"
        )
    req_id = head.get("id")
    return InferRequest(
        inputs=inputs,
        outputs=_parse_outputs(head.get("outputs")),
        parameters=params,
        id=str(req_id) if req_id is not None else None,
        binary_output=bool(params.get("binary_data_output", False)),
    )


def _header_length(value: str | None, body_len: int) -> int:
    if value is None:
        return body_len
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 < n <= body_len:
        raise RequestError(
            f"header {HEADER_LENGTH}={value!r} must be an integer in 1..{body_len} (the body length)"
        )
    return n


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _parse_input(i: int, raw: Any, binary: memoryview, offset: int, limits: ParseLimits) -> tuple[str, np.ndarray, int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise RequestError(f"inputs[{i}] must be an object with a string 'name'")
    name = raw["name"][:128]
    count = check_shape(name, raw.get("shape"), len(binary.obj), limits)  # every element costs a byte
    shape = raw["shape"]
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in NUMPY_OF:
        raise RequestError(
            f"input '{name}': datatype {str(datatype)[:40]!r} is not supported; use one of {', '.join(NUMPY_OF)}"
        )
    dtype = NUMPY_OF[datatype]
    params = _mapping(raw.get("parameters"), f"input '{name}' parameters")
    size = params.get("binary_data_size")
    if size is not None:
        return name, _from_binary(name, dtype, shape, count, size, binary, offset), size
    if "data" not in raw:
        raise RequestError(f"input '{name}' has neither 'data' nor a 'binary_data_size' parameter")
    return name, _from_json(name, dtype, shape, count, raw["data"]), 0


def _from_binary(name, dtype, shape, count, size, binary, offset) -> np.ndarray:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RequestError(f"input '{name}': 'binary_data_size' must be a non-negative integer")
    if size != count * dtype.itemsize:
        raise RequestError(
            f"input '{name}': binary_data_size is {size} bytes but shape {shape} of "
            f"{kserve_datatype(dtype)} needs {count * dtype.itemsize}"
        )
    if offset + size > len(binary):
        raise RequestError(f"input '{name}': the body ends before its {size} bytes of binary data")
    arr = np.frombuffer(binary[offset : offset + size], dtype=dtype.newbyteorder("<"))
    return arr.astype(dtype).reshape(shape)  # a private, writable, native-order copy


def _from_json(name, dtype, shape, count, data) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, RecursionError) as e:
        raise RequestError(f"input '{name}': 'data' is not a rectangular array: {e}") from e
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        found = {"U": "strings", "S": "bytes"}.get(arr.dtype.kind, "non-numeric values")
        raise RequestError(f"input '{name}': 'data' must hold numbers, found {found}")
    if arr.size != count:
        raise RequestError(f"input '{name}': 'data' has {arr.size} values but shape {shape} needs {count}")
    if dtype.kind in "iu" and arr.size:
        if arr.dtype.kind == "f" and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise RequestError(f"input '{name}' holds non-integer values; its datatype is {kserve_datatype(dtype)}")
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise RequestError(f"input '{name}' holds values outside the range of {kserve_datatype(dtype)}")
    elif dtype.kind == "b" and arr.dtype.kind != "b":
        raise RequestError(f"input '{name}': BOOL data must be true/false values")
    return arr.astype(dtype).reshape(shape)


def _parse_outputs(raw: Any) -> list[tuple[str, bool]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise RequestError("'outputs' must be a list of {'name': ...} objects")
    out = []
    for i, o in enumerate(raw):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise RequestError(f"outputs[{i}] must be an object with a string 'name'")
        params = _mapping(o.get("parameters"), f"output '{o['name']}' parameters")
        if params.get("classification"):
            raise RequestError(f"output '{o['name']}': the classification extension is not supported")
        out.append((o["name"], bool(params.get("binary_data", False))))
    return out


def encode_response(
    model: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """The response body and extra HTTP headers (binary outputs appended after the JSON)."""
    wanted = request.outputs
    if wanted is None:
        wanted = [(name, request.binary_output) for name in outputs]
    head_outputs, blobs = [], []
    for name, binary in wanted:
        arr = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": kserve_datatype(arr.dtype), "shape": list(arr.shape)}
        if binary:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        head_outputs.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": head_outputs}
    if request.id is not None:
        head["id"] = request.id
    head_bytes = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return head_bytes, {"content-type": "application/json"}
    return head_bytes + b"".join(blobs), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(head_bytes)),
    }
