"""The KServe v2 / Triton HTTP routes a Triton client meets: config, stats, unload, errors,
versions, compression and strict shapes, each through ``tritonclient.http`` on a real server."""

from __future__ import annotations

import gzip
import json
import os
import zlib

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from runtime.serving import ServerThread, build_app
from tests.serving.conftest import make_request
from tests.serving.http_utils import json_body, triton_inputs, triton_scores

MODEL = "toysplit"


@pytest.fixture(scope="module")
def server(split_bundle):
    with ServerThread(build_app([split_bundle], max_delay_ms=1.0, max_body_bytes=1 << 20)) as srv:
        yield srv


@pytest.fixture(scope="module")
def tclient(server):
    return triton.InferenceServerClient(f"127.0.0.1:{server.port}")


def test_model_config_fields_a_triton_client_reads(tclient):
    config = tclient.get_model_config(MODEL)
    assert (config["name"], config["platform"], config["backend"]) == (MODEL, "ugsep_onnxruntime", "onnxruntime")
    assert config["max_batch_size"] == 0
    assert {t["name"]: (t["data_type"], t["dims"]) for t in config["input"]} == {
        "user_ids": ("TYPE_INT64", [1, 3]), "user_dense": ("TYPE_FP32", [1, 4]),
        "item_ids": ("TYPE_INT64", [-1, 2]), "item_dense": ("TYPE_FP32", [-1, 2]),
    }
    assert config["output"] == [{"name": "ctr", "data_type": "TYPE_FP32", "dims": [-1]}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 1000,
                                          "default_queue_policy": {"max_queue_size": 512}}
    with pytest.raises(InferenceServerException, match="'nope' is not loaded"):
        tclient.get_model_config("nope")


def test_statistics_count_requests_and_phases(server, tclient):
    before = tclient.get_inference_statistics(MODEL)["model_stats"][0]
    for seed in (1, 2, 3):
        triton_scores(tclient, MODEL, *make_request(seed, 5), binary=True)
    (after,) = tclient.get_inference_statistics(MODEL)["model_stats"]
    assert after["name"] == MODEL and after["version"] == "1"
    assert after["inference_count"] == before["inference_count"] + 3
    s = after["inference_stats"]
    assert s["success"]["count"] == before["inference_stats"]["success"]["count"] + 3 and s["success"]["ns"] > 0
    assert s["compute_infer"]["count"] > 0 and s["compute_input"]["ns"] > 0 and s["queue"]["count"] >= 3
    assert after["execution_count"] >= 1 and after["last_inference"] > 0
    assert [m["name"] for m in tclient.get_inference_statistics()["model_stats"]] == [MODEL]
    text = httpx.get(server.url + "/metrics").text
    for phase in ("decode", "validate", "queue", "group", "encode"):
        assert f'ugsep_phase_seconds_count{{model="{MODEL}",phase="{phase}"}}' in text, phase
    assert 'phase="user"' in text or 'phase="cache_hit"' in text


def test_unmatched_routes_and_405_use_the_protocol_error_body(server, tclient):
    with pytest.raises(InferenceServerException, match="Not Found"):
        tclient.get_inference_statistics("a/b")  # GET /v2/models/a/b/stats: no such route
    r = httpx.get(server.url + "/v2/models/toysplit/infer")
    assert r.status_code == 405 and r.json()["error"].startswith("Method Not Allowed")
    r = httpx.get(server.url + "/nowhere")
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_user_input_must_be_one_row_and_strings_are_named(server, tclient):
    user, cands = make_request(4, 3)
    flat = {**user, "user_dense": user["user_dense"].reshape(4)}
    with pytest.raises(InferenceServerException, match=r"'user_dense' has shape \[4\].*takes \[1, 4\]"):
        triton_scores(tclient, MODEL, flat, cands, binary=True)
    body = json_body(user, cands)
    body["inputs"][1]["data"] = ["a", "b", "c", "d"]
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 400 and r.json()["error"] == "input 'user_dense': 'data' must hold numbers, found strings"


@pytest.mark.parametrize("request_algo,response_algo", [("gzip", "gzip"), ("deflate", None), (None, "gzip")])
def test_compressed_requests_and_responses(server, scorer, request_algo, response_algo):
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    user, cands = make_request(5, 200)
    result = client.infer(MODEL, triton_inputs(user, cands, binary=False),
                          outputs=[triton.InferRequestedOutput("ctr", binary_data=False)],
                          request_compression_algorithm=request_algo, response_compression_algorithm=response_algo)
    np.testing.assert_array_equal(result.as_numpy("ctr"), scorer.score(user, cands)["ctr"])


def test_compression_on_the_wire_and_its_limits(server, scorer):
    user, cands = make_request(6, 200)
    raw = json.dumps(json_body(user, cands)).encode()
    url = f"{server.url}/v2/models/{MODEL}/infer"
    with httpx.Client() as c:
        r = c.post(url, content=zlib.compress(raw), headers={"Content-Encoding": "deflate", "Accept-Encoding": "gzip"})
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
        np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32),
                                      scorer.score(user, cands)["ctr"])
        bomb = gzip.compress(b" " * (2 << 20))  # inflates past the 1 MiB body limit
        assert c.post(url, content=bomb, headers={"Content-Encoding": "gzip"}).status_code == 413
        r = c.post(url, content=b"not gzip", headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and "not valid gzip" in r.json()["error"]
        assert c.post(url, content=raw, headers={"Content-Encoding": "br"}).status_code == 415


def test_version_policy_survives_reloads_and_unload(split_bundle, split_bundle_v2, scorer):
    # model control is off by default (control.py): enabled here with its token and a model root
    root = os.path.commonpath([split_bundle, split_bundle_v2])
    app = build_app([split_bundle], enable_model_control=True, control_token="ctl", model_root=root)
    auth = {"Authorization": "Bearer ctl"}
    with ServerThread(app) as srv:
        client = triton.InferenceServerClient(f"127.0.0.1:{srv.port}")
        user, cands = make_request(7, 4)
        expected = scorer.score(user, cands)["ctr"]

        def pinned(version: str) -> np.ndarray:
            out = [triton.InferRequestedOutput("ctr", binary_data=True)]
            return client.infer(MODEL, triton_inputs(user, cands, True), model_version=version,
                                outputs=out).as_numpy("ctr")

        assert not client.is_model_ready(MODEL, "7")
        with pytest.raises(InferenceServerException, match="version 7 is not loaded"):
            client.get_model_metadata(MODEL, "7")
        client.load_model(MODEL, headers=auth)  # the same files: the version stays 1, pinned clients keep working
        assert client.get_model_metadata(MODEL)["versions"] == ["1"] and client.is_model_ready(MODEL, "1")
        np.testing.assert_array_equal(pinned("1"), expected)
        r = httpx.post(f"{srv.url}/v2/repository/models/{MODEL}/load",
                       json={"parameters": {"bundle": str(split_bundle_v2)}}, headers=auth)
        assert r.json()["version"] == "2"  # new files: the next version; version 1 is gone
        assert client.is_model_ready(MODEL, "2") and not client.is_model_ready(MODEL, "1")
        with pytest.raises(InferenceServerException, match="version 1 is not loaded"):
            pinned("1")
        assert not np.array_equal(pinned("2"), expected)
        client.unload_model(MODEL, headers=auth)
        assert not client.is_model_ready(MODEL)
        assert client.get_model_repository_index() == [{"name": MODEL, "state": "UNAVAILABLE", "reason": "unloaded"}]
        with pytest.raises(InferenceServerException, match="'toysplit' is not loaded"):
            pinned("2")
        with pytest.raises(InferenceServerException, match="is not loaded"):
            client.unload_model(MODEL, headers=auth)
        client.load_model(MODEL, headers=auth)  # back from its last bundle: the same files keep version 2
        assert client.is_model_ready(MODEL, "2")
