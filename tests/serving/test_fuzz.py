"""Fuzzing the infer endpoint: malformed requests get 4xx, never 5xx, and the server stays healthy."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.serving import ServerThread, build_app
from tests.serving.conftest import make_request
from tests.serving.http_utils import json_body

MODEL = "toysplit"
URL = f"/v2/models/{MODEL}/infer"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ("name", "shape", "datatype", "data", "parameters")


@pytest.fixture(scope="module")
def http(split_bundle):
    with ServerThread(build_app([split_bundle], max_candidates=64, max_body_bytes=1 << 16)) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            yield client


def _valid_body() -> dict:
    return json_body(*make_request(3, 4))


def _assert_client_error(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert "error" in r.json()


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(http, raw):
    _assert_client_error(http.post(URL, content=raw))


@FUZZ
@given(json_values)
def test_random_json_documents(http, doc):
    _assert_client_error(http.post(URL, content=json.dumps(doc)))


@FUZZ
@given(st.integers(0, 3), st.sampled_from(FIELDS), json_values)
def test_one_field_of_one_input_replaced(http, index, field, value):
    body = _valid_body()
    if body["inputs"][index].get(field) == value:
        return
    body["inputs"][index][field] = value
    r = http.post(URL, content=json.dumps(body))
    # a replacement can happen to be valid (e.g. 'parameters': {}): then it must score
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)


@FUZZ
@given(st.integers(0, 3), st.sampled_from([-1, 40, 50, 2**40, -(2**62)]) | st.sampled_from([float("nan"), float("inf")]))
def test_bad_values(http, index, bad):
    body = _valid_body()
    body["inputs"][index]["data"][0] = bad
    r = http.post(URL, content=json.dumps(body))
    if index in (1, 3) and not isinstance(bad, float):  # an int is a fine float feature
        assert r.status_code == 200
    elif index == 0 and bad == 40:  # user ids allow 0..49
        assert r.status_code == 200
    else:
        _assert_client_error(r)
        assert body["inputs"][index]["name"] in r.json()["error"]


@FUZZ
@given(st.integers(0, 3), st.integers(-8, 64), st.one_of(st.none(), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=6), st.integers(-5, 5000)))
def test_binary_sizes_and_header_lengths(http, index, size_delta, header):
    body = _valid_body()
    arrays = [np.asarray(i["data"], np.int64 if i["datatype"] == "INT64" else np.float32) for i in body["inputs"]]
    blob = b""
    for i, (inp, arr) in enumerate(zip(body["inputs"], arrays, strict=True)):
        raw = arr.tobytes()
        inp.pop("data")
        inp["parameters"] = {"binary_data_size": len(raw) + (size_delta if i == index else 0)}
        blob += raw
    head = json.dumps(body).encode()
    length = str(len(head)) if header is None else str(header)
    r = http.post(URL, content=head + blob, headers={"Inference-Header-Content-Length": length})
    if size_delta == 0 and length == str(len(head)):
        assert r.status_code == 200
    else:
        _assert_client_error(r)


def test_server_is_healthy_and_exact_after_fuzzing(http, scorer):
    assert http.get("/v2/health/ready").status_code == 200
    user, cands = make_request(11, 5)
    r = http.post(URL, json=json_body(user, cands))
    np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32),
                                  scorer.score(user, cands)["ctr"])
    metrics = http.get("/metrics").text
    assert 'reason="internal"' not in metrics
