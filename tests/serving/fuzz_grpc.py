"""Hypothesis strategies for hostile KServe v2 gRPC infer calls, by class, and a sender for them.

The gRPC twin of tests/serving/fuzz_requests.py, shared by tests/serving/test_fuzz_grpc.py
(a few hundred calls in ``make test``) and benchmarks/fuzz_server.py (10,000+). Each
strategy draws a ``GCase``: a ``ModelInferRequest`` (or raw message bytes, or a slow raw
HTTP/2 stream) and how to send it (deadline, cancel after a delay), with ``expect``: the
status codes the documented mapping allows for that class (docs/serving-protocol.md).
INTERNAL and UNKNOWN are never expected: they would be a server fault for a client's one.
Inputs come from the model's metadata (the HTTP metadata document: any model).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.serving.fuzz_requests import valid_inputs

METHOD = "/inference.GRPCInferenceService/ModelInfer"
NUMPY = {"INT64": np.int64, "FP32": np.float32, "INT32": np.int32, "FP64": np.float64, "BOOL": np.bool_}
TYPED = {"INT64": "int64_contents", "FP32": "fp32_contents", "INT32": "int_contents", "FP64": "fp64_contents",
         "BOOL": "bool_contents"}
OK, INVALID, NOT_FOUND = "OK", "INVALID_ARGUMENT", "NOT_FOUND"
NO_RESPONSE = "NO_RESPONSE"  # a slow client that hangs up mid-message: nobody to answer


@dataclass
class GCase:
    """One call: ``request`` (a message, or bytes sent as they are), or ``slow`` (raw HTTP/2)."""

    cls: str
    request: pb.ModelInferRequest | bytes | None
    expect: frozenset[str]
    timeout: float = 60.0
    cancel_after: float | None = None
    slow: tuple[int, float] | None = None  # (bytes dribbled, seconds held) before hanging up


def to_request(model: str, inputs: list[dict], typed: bool = False, version: str = "") -> pb.ModelInferRequest:
    """``inputs`` (name, shape, datatype, data: a JSON-style list) as a raw (or typed) gRPC request."""
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for x in inputs:
        t = req.inputs.add(name=x["name"], datatype=x["datatype"], shape=x["shape"])
        arr = np.asarray(x["data"], NUMPY[x["datatype"]])
        if typed:
            getattr(t.contents, TYPED[x["datatype"]]).extend(arr.reshape(-1).tolist())
        else:
            req.raw_input_contents.append(arr.tobytes())
    return req


def strategies(meta: dict, max_message_bytes: int) -> dict[str, st.SearchStrategy[GCase]]:
    """Every gRPC call class for the model of ``meta`` on a server receiving at most ``max_message_bytes``."""
    model = meta["name"]
    base = st.builds(valid_inputs, st.just(meta), st.integers(1, 6), st.integers(0, 99))
    idx = st.integers(0, len(meta["inputs"]) - 1)
    floats = [i for i, s in enumerate(meta["inputs"]) if s["datatype"].startswith("FP")]
    ints = [i for i, s in enumerate(meta["inputs"]) if s["datatype"].startswith(("INT", "UINT"))]
    ok_or_invalid = frozenset({OK, INVALID})

    def case(cls, expect=frozenset({INVALID}), **kw):
        return lambda req: GCase(cls, req, expect, **kw)

    @st.composite
    def valid(d):
        return GCase("grpc_valid", to_request(model, d(base), typed=d(st.booleans())), frozenset({OK}))

    @st.composite
    def bad_contents(d):
        req, i = to_request(model, d(base)), d(idx)
        how = d(st.sampled_from(["drop_raw", "extra_raw", "cut", "grow", "replace", "raw_and_typed",
                                 "typed_wrong_field", "typed_count"]))
        raw = req.raw_input_contents
        if how == "drop_raw":
            del raw[i]
        elif how == "extra_raw":
            raw.append(d(st.binary(max_size=64)))
        elif how == "cut":
            raw[i] = raw[i][: d(st.integers(0, max(len(raw[i]) - 1, 0)))]
        elif how == "grow":
            raw[i] = raw[i] + d(st.binary(min_size=1, max_size=64))
        elif how == "replace":
            blob = d(st.binary(max_size=128))
            raw[i] = blob if len(blob) != len(raw[i]) else blob + b"\0"
        elif how == "raw_and_typed":
            req.inputs[i].contents.bytes_contents.append(b"x")
        else:  # typed contents in the wrong field, or with the wrong number of values
            req = to_request(model, d(base), typed=True)
            t = req.inputs[i]
            field = TYPED[t.datatype]
            values = list(getattr(t.contents, field))
            t.ClearField("contents")
            if how == "typed_wrong_field":
                other = d(st.sampled_from(sorted({"int_contents", "uint_contents", "fp64_contents",
                                                  "bool_contents", "uint64_contents"} - {field})))
                getattr(t.contents, other).extend([1] * len(values))
            else:
                getattr(t.contents, field).extend(values + values[:1] if d(st.booleans()) or not values
                                                  else values[:-1])
        return GCase("grpc_bad_contents", req, frozenset({INVALID}))

    @st.composite
    def wrong_datatype(d):
        req, i = to_request(model, d(base)), d(idx)
        dt = d(st.sampled_from(["BYTES", "FP16", "BF16", "BOOL", "INT8", "UINT64", "FP64", "INT32", "fp32",
                                "", "STRING", "TYPE_FP32"]) | st.text(max_size=12))
        if dt == req.inputs[i].datatype:
            dt += "X"
        req.inputs[i].datatype = dt
        return GCase("grpc_wrong_datatype", req, frozenset({INVALID}))

    @st.composite
    def wrong_shape(d):
        req, i = to_request(model, d(base)), d(idx)
        shape = d(st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 8), max_size=40)
                  | st.integers(33, 200_000).map(lambda n: [1] * n))  # past numpy's 64 dims too
        if shape == list(req.inputs[i].shape):
            shape.append(1)
        del req.inputs[i].shape[:]
        req.inputs[i].shape.extend(shape)
        return GCase("grpc_wrong_shape", req, frozenset({INVALID}))

    @st.composite
    def huge_shape(d):
        req, i = to_request(model, d(base)), d(idx)
        del req.inputs[i].shape[:]
        req.inputs[i].shape.extend(d(st.lists(st.integers(1000, 2**62), min_size=1, max_size=4)))
        req.raw_input_contents[i] = d(st.binary(max_size=16))
        return GCase("grpc_huge_shape_tiny_payload", req, frozenset({INVALID}))

    @st.composite
    def missing(d):
        inputs = d(base)
        drop = d(st.sets(idx, min_size=1))
        kept = [x for j, x in enumerate(inputs) if j not in drop]
        if d(st.booleans()) and kept:
            kept.append(dict(kept[0]))
        if not kept or d(st.booleans()):
            kept.append({"name": d(st.text(max_size=20)) + "_not_an_input", "shape": [1], "datatype": "FP32",
                         "data": [0.0]})
        return GCase("grpc_missing_inputs", to_request(model, kept), frozenset({INVALID}))

    @st.composite
    def nan_inf(d):
        inputs = d(base)
        i = d(st.sampled_from(floats))
        flat = np.asarray(inputs[i]["data"], np.float64)
        bad = d(st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]), min_size=1,
                         max_size=len(flat)))
        flat[: len(bad)] = bad
        inputs[i]["data"] = flat.tolist()
        return GCase("grpc_nan_inf", to_request(model, inputs), frozenset({INVALID}))

    @st.composite
    def oov_ids(d):
        inputs = d(base)
        i = d(st.sampled_from(ints))
        flat = list(inputs[i]["data"])
        bad = d(st.lists(st.integers(-(2**63), -1) | st.integers(10**6, 2**63 - 1), min_size=1,
                         max_size=len(flat)))
        flat[: len(bad)] = bad
        inputs[i]["data"] = flat
        return GCase("grpc_out_of_vocabulary", to_request(model, inputs), frozenset({INVALID}))

    @st.composite
    def unknown_model(d):
        req = to_request(model, d(base))
        if d(st.booleans()):
            name = d(st.text(max_size=40) | st.integers(1, 100_000).map(lambda n: "m" * n))
            req.model_name = name if name != model else name + "x"
        else:
            version = d(st.text(min_size=1, max_size=20) | st.integers(2, 10**30).map(str))
            req.model_version = version if version != "1" else "2"
        return GCase("grpc_unknown_model", req, frozenset({NOT_FOUND}))

    @st.composite
    def oversize(d):
        req, i = to_request(model, d(base)), d(idx)
        req.raw_input_contents[i] = bytes(max_message_bytes + d(st.integers(1, 1 << 20)))
        return GCase("grpc_oversize_message", req, frozenset({"RESOURCE_EXHAUSTED"}))

    garbage = st.binary(max_size=400).map(
        lambda b: GCase("grpc_garbage_message", b, frozenset({INVALID, NOT_FOUND})))  # b"": model ""

    @st.composite
    def field_mutation(d):
        req = to_request(model, d(base), typed=d(st.booleans()))
        what = d(st.sampled_from(["id", "parameter", "output", "input_parameter"]))
        if what == "id":
            req.id = d(st.text(max_size=300))
        elif what == "output":
            req.outputs.add(name=d(st.text(max_size=20)))
        else:
            target = req.parameters if what == "parameter" else req.inputs[d(idx)].parameters
            key = d(st.sampled_from(["user_key", "binary_data_size", "priority", "timeout"]) | st.text(max_size=8))
            kind, value = d(st.sampled_from([
                ("bool_param", st.booleans()), ("int64_param", st.integers(-(2**63), 2**63 - 1)),
                ("string_param", st.text(max_size=300)), ("double_param", st.floats()),
                ("uint64_param", st.integers(0, 2**64 - 1))]))
            setattr(target[key], kind, d(value))
        return GCase("grpc_field_mutation", req, ok_or_invalid)

    @st.composite
    def cancelled(d):
        return GCase("grpc_cancelled", to_request(model, d(base)), frozenset({OK, "CANCELLED"}),
                     cancel_after=d(st.floats(0.0, 0.03)))

    @st.composite
    def deadline(d):
        return GCase("grpc_deadline_exceeded", to_request(model, d(base)), frozenset({OK, "DEADLINE_EXCEEDED"}),
                     timeout=d(st.sampled_from([1e-4, 1e-3, 5e-3]) | st.floats(1e-4, 0.05)))

    slow = st.tuples(st.integers(0, 200), st.floats(0.05, 1.0)).map(
        lambda t: GCase("grpc_slow_client", None, frozenset({NO_RESPONSE}), slow=t))

    return {
        "grpc_valid": valid(), "grpc_bad_contents": bad_contents(), "grpc_wrong_datatype": wrong_datatype(),
        "grpc_wrong_shape": wrong_shape(), "grpc_huge_shape_tiny_payload": huge_shape(),
        "grpc_missing_inputs": missing(), "grpc_nan_inf": nan_inf(), "grpc_out_of_vocabulary": oov_ids(),
        "grpc_unknown_model": unknown_model(), "grpc_oversize_message": oversize(),
        "grpc_garbage_message": garbage, "grpc_field_mutation": field_mutation(), "grpc_cancelled": cancelled(),
        "grpc_deadline_exceeded": deadline(), "grpc_slow_client": slow,
    }


class GrpcSender:
    """Sends ``GCase`` calls on one channel; ``send`` returns the status code's name
    (``OK``, ``INVALID_ARGUMENT``, ...; ``NO_RESPONSE`` for a slow client that hung up)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.raw = self.channel.unary_unary(METHOD)  # bytes in, bytes out
        self.slow_threads: list[threading.Thread] = []

    def send(self, case: GCase) -> str:
        if case.slow is not None:
            t = threading.Thread(target=slow_stream, args=(self.port, *case.slow), daemon=True)
            t.start()  # it dribbles on while the next calls are sent
            self.slow_threads.append(t)
            return NO_RESPONSE
        call = self.raw if isinstance(case.request, bytes) else self.stub.ModelInfer
        future = call.future(case.request, timeout=case.timeout)
        if case.cancel_after is not None:
            time.sleep(case.cancel_after)
            future.cancel()
        try:
            future.result()
        except grpc.RpcError as e:
            return e.code().name
        except grpc.FutureCancelledError:
            return "CANCELLED"
        return OK

    def close(self) -> None:
        for t in self.slow_threads:
            t.join(5)
        self.channel.close()


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header without indexing (names and values under 127 bytes)."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def slow_stream(port: int, dribble: int, hold_s: float) -> None:
    """A raw HTTP/2 client: a ModelInfer stream whose message announces 1 MB, of which
    ``dribble`` bytes arrive one by one over ``hold_s`` seconds; then it hangs up."""
    headers = b"".join(_literal(k, v) for k, v in [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", METHOD.encode()),
        (b":authority", b"127.0.0.1"), (b"content-type", b"application/grpc"), (b"te", b"trailers")])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"") + _frame(1, 4, 1, headers)
                      + _frame(0, 0, 1, b"\x00" + struct.pack(">I", 1 << 20)))
            for _ in range(dribble):
                s.sendall(_frame(0, 0, 1, b"\x0a"))
                time.sleep(hold_s / max(dribble, 1))
            if not dribble:
                time.sleep(hold_s)
    except OSError:
        pass  # the server may close a stalled connection first: that is fine
