"""Hypothesis strategies for hostile infer requests, by class, and a sender for them.

Shared by tests/serving/test_fuzz_server.py (a few hundred requests in ``make test``) and
benchmarks/fuzz_server.py (10,000+). Each strategy draws a ``Case``: raw body bytes,
headers, and how to send it (a normal HTTP POST, or a raw socket for bodies that lie
about their length). The request's inputs come from the model's metadata (any model).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

import httpx
from hypothesis import strategies as st

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class Case:
    """One request to send: ``kind`` 'http' (httpx) or 'truncated' (raw socket, half-closed)."""

    cls: str
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON_HEADERS))
    kind: str = "http"
    declared: int | None = None  # Content-Length for 'truncated'


def valid_inputs(meta: dict, n: int, seed: int) -> list[dict]:
    """A valid JSON 'inputs' list for the model of ``meta`` with ``n`` candidates (ids 0..9)."""
    out = []
    for i, spec in enumerate(meta["inputs"]):
        shape = [n if d == -1 else d for d in spec["shape"]]
        count = 1
        for d in shape:
            count *= d
        dt = spec["datatype"]
        data = [(seed + i + k) % 10 for k in range(count)] if dt.startswith(("INT", "UINT")) else \
            [((seed * 7 + k) % 13) / 13 - 0.5 for k in range(count)]
        out.append({"name": spec["name"], "shape": shape, "datatype": dt, "data": data})
    return out


def _dump(doc) -> bytes:
    return json.dumps(doc).encode()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def strategies(meta: dict) -> dict[str, st.SearchStrategy[Case]]:
    """Every request class for the model of ``meta``."""
    base = st.builds(valid_inputs, st.just(meta), st.integers(1, 6), st.integers(0, 99))
    idx = st.integers(0, len(meta["inputs"]) - 1)

    def with_input(field_name, values):
        @st.composite
        def draw(d):
            inputs, i = d(base), d(idx)
            inputs[i][field_name] = d(values)
            return {"inputs": inputs}
        return draw()

    big_digits = st.integers(4301, 20000)  # past Python's int-string limit (4300 digits)
    return {
        "valid": base.map(lambda inp: Case("valid", _dump({"inputs": inp}))),
        "huge_shape_list": st.integers(10_000, 120_000).map(
            lambda n: Case("huge_shape_list", _dump({"inputs": [{"name": meta["inputs"][0]["name"], "shape": [2] * n,
                                                                 "datatype": "INT64", "data": [1, 2]}]}))),
        "huge_ints": st.tuples(big_digits, st.sampled_from(["data", "shape", "id", "binary_data_size"]), base).map(
            lambda t: Case("huge_ints", _huge_int_body(*t))),
        # at least one value past uint64 / int64 (2**63..2**64 alone is a valid float feature)
        "big_ints": with_input("data", st.tuples(
            st.lists(st.integers(2**63, 2**300) | st.integers(-(2**300), -(2**63)), max_size=7),
            st.integers(2**64, 2**300) | st.integers(-(2**300), -(2**63) - 1)).map(lambda t: [*t[0], t[1]])
        ).map(lambda d: Case("big_ints", _dump(d))),
        "many_dims": st.tuples(st.integers(33, 300), base).map(lambda t: Case("many_dims", _many_dims(*t))),
        "oversized_array": st.tuples(st.lists(st.integers(10**3, 10**12), min_size=1, max_size=4), idx, base).map(
            lambda t: Case("oversized_array", _oversized(*t))),
        "wrong_dtype": with_input("datatype", st.sampled_from(["BYTES", "FP16", "BOOL", "INT8", "UINT64", "FP64",
                                                              "fp32", "", "STRING"]) | st.text(max_size=8)
                                  ).map(lambda d: Case("wrong_dtype", _dump(d))),
        # at least one non-finite value (finite floats alone can be a valid request)
        "nan_inf": with_input("data", st.tuples(
            st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]) | st.floats(), max_size=7),
            st.sampled_from([float("nan"), float("inf"), -float("inf")])).map(lambda t: [*t[0], t[1]])
        ).map(lambda d: Case("nan_inf", _dump(d))),
        "missing_inputs": st.tuples(base, st.sets(idx, min_size=1), st.booleans()).map(
            lambda t: Case("missing_inputs", _missing(*t))),
        "bad_json": (st.binary(max_size=400) | st.text(max_size=200).map(str.encode) |
                     base.map(lambda inp: _dump({"inputs": inp})[: len(_dump({"inputs": inp})) // 2])).map(
            lambda b: Case("bad_json", b)),
        "deep_nesting": st.tuples(st.integers(40, 200_000), st.booleans()).map(
            lambda t: Case("deep_nesting", _deep(*t))),
        "wrong_content_type": st.tuples(st.sampled_from(["text/plain", "application/x-www-form-urlencoded",
                                                         "multipart/form-data; boundary=x", "application/xml",
                                                         "image/png"]), base).map(
            lambda t: Case("wrong_content_type", _dump({"inputs": t[1]}), {"Content-Type": t[0]})),
        "binary_header_lies": st.tuples(base, idx, st.integers(-64, 64), st.one_of(
            st.none(), st.integers(-5, 10**6).map(str), st.sampled_from(["", "x", "1e3", "9" * 5000]))).map(
            lambda t: _binary_lie(*t)),
        "truncated_body": st.tuples(base, st.floats(0.0, 0.95), st.integers(1, 10**6)).map(
            lambda t: _truncated(*t)),
        "field_mutation": st.tuples(base, idx, st.sampled_from(["name", "shape", "datatype", "data", "parameters"]),
                                    _json_values).map(lambda t: Case("field_mutation", _mutate(*t))),
    }


def _huge_int_body(digits: int, where: str, inputs: list[dict]) -> bytes:
    huge = "1" + "0" * digits
    doc = _dump({"inputs": inputs, "id": "ID"}).decode()
    if where == "data":
        doc = doc.replace('"data": [', f'"data": [{huge}, ', 1)
    elif where == "shape":
        doc = doc.replace('"shape": [', f'"shape": [{huge}, ', 1)
    elif where == "id":
        doc = doc.replace('"ID"', huge, 1)
    else:
        doc = doc.replace('"data": [', f'"parameters": {{"binary_data_size": {huge}}}, "data": [', 1)
    return doc.encode()


def _many_dims(dims: int, inputs: list[dict]) -> bytes:
    inputs[0]["shape"] = [1] * dims
    data: object = 1
    for _ in range(min(dims, 30)):
        data = [data]
    inputs[0]["data"] = data
    return _dump({"inputs": inputs})


def _oversized(shape: list[int], i: int, inputs: list[dict]) -> bytes:
    inputs[i]["shape"] = shape
    return _dump({"inputs": inputs})


def _missing(inputs: list[dict], drop: set[int], duplicate: bool) -> bytes:
    kept = [x for j, x in enumerate(inputs) if j not in drop]
    if duplicate and kept:
        kept.append(dict(kept[0]))
    if not kept:
        kept = [{"name": "not_an_input", "shape": [1], "datatype": "FP32", "data": [0.0]}]
    return _dump({"inputs": kept})


def _deep(depth: int, as_data: bool) -> bytes:
    nest = b"[" * depth + b"1" + b"]" * depth
    if not as_data:
        return nest
    return b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + nest + b"}]}"


def _binary_lie(inputs: list[dict], i: int, delta: int, header: str | None) -> Case:
    import numpy as np

    blob = b""
    for j, x in enumerate(inputs):
        dt = np.int64 if x["datatype"] == "INT64" else np.float32
        raw = np.asarray(x.pop("data"), dt).tobytes()
        x["parameters"] = {"binary_data_size": len(raw) + (delta if j == i else 0)}
        blob += raw
    head = _dump({"inputs": inputs})
    length = str(len(head)) if header is None else header
    return Case("binary_header_lies", head + blob,
                {HEADER_LENGTH: length, "Content-Type": "application/octet-stream"})


def _truncated(inputs: list[dict], frac: float, extra: int) -> Case:
    body = _dump({"inputs": inputs})
    sent = body[: int(len(body) * frac)]
    return Case("truncated_body", sent, kind="truncated", declared=len(body) + extra)


def _mutate(inputs: list[dict], i: int, name: str, value) -> bytes:
    inputs[i][name] = value
    return _dump({"inputs": inputs})


def send(client: httpx.Client, port: int, path: str, case: Case) -> int:
    """Send ``case``; its HTTP status, or 0 when the server closed without answering
    (expected only for truncated bodies, whose client hangs up mid-body)."""
    if case.kind == "truncated":
        return _send_truncated(port, path, case)
    return client.post(path, content=case.body, headers=case.headers).status_code


def _send_truncated(port: int, path: str, case: Case) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {case.declared}\r\n\r\n".encode() + case.body)
        s.shutdown(socket.SHUT_WR)  # the client is gone before its body ended
        try:
            data = s.recv(4096)
        except OSError:
            return 0
    try:
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    except (ValueError, IndexError):
        return 0
