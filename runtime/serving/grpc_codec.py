"""KServe v2 gRPC codec: ``ModelInferRequest`` -> ``InferRequest`` and outputs -> ``ModelInferResponse``.

The messages are the generated ``inference`` protobuf classes ``tritonclient`` ships
(``tritonclient.grpc.service_pb2``: the KServe v2 / Open Inference Protocol
``GRPCInferenceService`` plus Triton's extensions), so nothing is generated or vendored
here. Inputs come either as ``raw_input_contents`` (one little-endian byte string per
input, in the order the inputs are listed: what ``tritonclient.grpc`` sends) or as typed
``contents`` (``fp32_contents``, ``int64_contents``, ...). Both are checked exactly as
the HTTP path checks JSON and binary tensors (``runtime.serving.protocol``): the same
one-line ``RequestError`` naming the input, and the same bounds (``bounds.check_shape``:
dims, elements per input from the spec) before any product or array is formed. Outputs
always go back as ``raw_output_contents``, as Triton's server does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from runtime.errors import RequestError
from runtime.serving.bounds import ParseLimits, check_shape
from runtime.serving.protocol import (
    NUMPY_OF,
    InferRequest,
    _from_binary,
    _from_json,
    kserve_datatype,
)

# KServe datatype -> the typed-contents field that carries it
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def parameter_value(p: pb.InferParameter) -> Any:
    """The Python value of one ``InferParameter`` (whichever of its fields is set)."""
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def decode_infer(request: pb.ModelInferRequest, limits: ParseLimits | None = None) -> InferRequest:
    """Decode and check one gRPC infer request (tensors by name, requested outputs, parameters)."""
    limits = limits or ParseLimits()
    if not request.inputs:
        raise RequestError("the request needs a non-empty 'inputs' list")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(
            f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; "
            "send raw contents for every input or for none"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name[:128]
        if name in inputs:
            raise RequestError(f"input '{name}' appears more than once in the request")
        inputs[name] = _decode_input(tensor, raw[i] if raw else None, limits)
    params = {k: parameter_value(v) for k, v in request.parameters.items()}
    outputs = [(o.name, True) for o in request.outputs] or None
    return InferRequest(inputs=inputs, outputs=outputs, parameters=params,
                        id=request.id or None, binary_output=True)


def _decode_input(tensor, raw: bytes | None, limits: ParseLimits) -> np.ndarray:
    name, shape = tensor.name[:128], list(tensor.shape)
    # every element costs at least one byte of the payload: raw bytes, or the tensor's message
    count = check_shape(name, shape, len(raw) if raw is not None else tensor.ByteSize(), limits)
    datatype = tensor.datatype
    if datatype not in NUMPY_OF:
        raise RequestError(
            f"input '{name}': datatype {datatype[:40]!r} is not supported; use one of {', '.join(NUMPY_OF)}"
        )
    dtype = NUMPY_OF[datatype]
    if raw is not None:
        if tensor.HasField("contents"):
            raise RequestError(f"input '{name}' has both typed 'contents' and raw_input_contents")
        return _from_binary(name, dtype, shape, count, len(raw), memoryview(raw), 0)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise RequestError(f"input '{name}': {datatype} tensors must be sent as raw_input_contents")
    data = getattr(tensor.contents, field)
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:
        raise RequestError(f"input '{name}' of {datatype} must use contents.{field}, not {others}")
    return _from_json(name, dtype, shape, count, np.asarray(data))


def encode_infer(model: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray]):
    """The ``ModelInferResponse``: every requested output (all when none was named) as raw bytes."""
    names = [n for n, _ in request.outputs] if request.outputs is not None else list(outputs)
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id or "")
    for name in names:
        arr = np.ascontiguousarray(outputs[name])
        response.outputs.add(name=name, datatype=kserve_datatype(arr.dtype), shape=list(arr.shape))
        response.raw_output_contents.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return response
