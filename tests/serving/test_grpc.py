"""KServe v2 over gRPC: tritonclient.grpc against a real ``ugsep serve --grpc-port`` subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.serving.conftest import make_request
from tests.serving.http_utils import triton_scores
from tests.serving.split_bundle import eager_scores
from tests.serving.test_sigterm import _free_port, _wait_ready

ROOT = Path(__file__).resolve().parents[2]
MODEL = "toysplit"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(split_bundle):
    """``ugsep serve BUNDLE --port P --grpc-port G`` (the console entry point) on loopback."""
    port, gport = _free_port(), _free_port()
    ugsep = Path(sys.executable).with_name("ugsep")
    cmd = [str(ugsep), "serve", str(split_bundle), "--port", str(port), "--grpc-port", str(gport),
           "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc)
        yield port, gport
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def gclient(served):
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{served[1]}")
    yield client
    client.close()


def _grpc_inputs(user: dict, cands: dict) -> list:
    out = []
    for k, v in {**user, **cands}.items():
        i = tgrpc.InferInput(k, list(v.shape), tgrpc.np_to_triton_dtype(v.dtype))
        i.set_data_from_numpy(v)  # raw_input_contents
        out.append(i)
    return out


def _grpc_scores(client, user: dict, cands: dict) -> np.ndarray:
    return client.infer(MODEL, _grpc_inputs(user, cands), outputs=[tgrpc.InferRequestedOutput("ctr")]).as_numpy("ctr")


def test_live_ready_and_metadata(gclient, served):
    assert gclient.is_server_live() and gclient.is_server_ready()
    assert gclient.is_model_ready(MODEL) and not gclient.is_model_ready("nope")
    assert gclient.is_model_ready(MODEL, "1") and not gclient.is_model_ready(MODEL, "7")
    server = gclient.get_server_metadata(as_json=True)
    assert server["name"] == "ugsep" and "model_repository" in server["extensions"]
    meta = gclient.get_model_metadata(MODEL, as_json=True)
    inputs = {i["name"]: (i["datatype"], [int(d) for d in i["shape"]]) for i in meta["inputs"]}
    assert inputs == {
        "user_ids": ("INT64", [1, 3]), "user_dense": ("FP32", [1, 4]),
        "item_ids": ("INT64", [-1, 2]), "item_dense": ("FP32", [-1, 2]),
    }
    assert meta["versions"] == ["1"] and [o["name"] for o in meta["outputs"]] == ["ctr"]
    with grpc.insecure_channel(f"127.0.0.1:{served[1]}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "inference.GRPCInferenceService"):
            got = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert got.status == health_pb2.HealthCheckResponse.SERVING


def test_model_config(gclient):
    config = gclient.get_model_config(MODEL, as_json=True)["config"]
    assert config["name"] == MODEL and config["backend"] == "onnxruntime"
    assert config["platform"] == "ugsep_onnxruntime" and config.get("max_batch_size", 0) == 0
    dims = {t["name"]: [int(d) for d in t["dims"]] for t in config["input"]}
    assert dims == {"user_ids": [1, 3], "user_dense": [1, 4], "item_ids": [-1, 2], "item_dense": [-1, 2]}
    assert config["output"][0]["data_type"] == "TYPE_FP32" and "dynamic_batching" in config


def test_raw_binary_infer_equals_http_python_api_and_eager(gclient, served, scorer, split_parts):
    http = thttp.InferenceServerClient(f"127.0.0.1:{served[0]}")
    for seed, n in [(1, 1), (2, 17), (3, 200)]:
        user, cands = make_request(seed, n)
        got = _grpc_scores(gclient, user, cands)
        assert got.dtype == np.float32 and got.shape == (n,)
        np.testing.assert_array_equal(got, scorer.score(user, cands)["ctr"])
        np.testing.assert_array_equal(got, triton_scores(http, MODEL, user, cands, binary=True))
        np.testing.assert_allclose(got, eager_scores(*split_parts, user, cands), rtol=1e-5, atol=1e-6)


def test_typed_contents_and_parameters(served, scorer):
    """A hand-built request with fp32_contents / int64_contents (no raw bytes) and a user_key."""
    user, cands = make_request(8, 5)
    req = pb.ModelInferRequest(model_name=MODEL, id="r-8")
    req.parameters["user_key"].string_param = "alice"
    for k, v in {**user, **cands}.items():
        t = req.inputs.add(name=k, datatype="INT64" if v.dtype == np.int64 else "FP32", shape=list(v.shape))
        field = t.contents.int64_contents if v.dtype == np.int64 else t.contents.fp32_contents
        field.extend(v.reshape(-1).tolist())
    with grpc.insecure_channel(f"127.0.0.1:{served[1]}") as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    assert resp.id == "r-8" and resp.model_version == "1" and list(resp.outputs[0].shape) == [5]
    got = np.frombuffer(resp.raw_output_contents[0], dtype="<f4")
    np.testing.assert_array_equal(got, scorer.score(user, cands)["ctr"])


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_bad_requests_are_invalid_argument_naming_the_input(gclient):
    user, cands = make_request(9, 4)
    user["user_dense"] = user["user_dense"][:, :3]  # [1, 3] where the model takes [1, 4]
    with pytest.raises(InferenceServerException) as e:
        _grpc_scores(gclient, user, cands)
    assert _status(e.value) == "StatusCode.INVALID_ARGUMENT" and "user_dense" in e.value.message()
    user, cands = make_request(9, 4)
    inputs = _grpc_inputs(user, {"item_ids": cands["item_ids"]})
    with pytest.raises(InferenceServerException) as e:
        gclient.infer(MODEL, inputs)
    assert _status(e.value) == "StatusCode.INVALID_ARGUMENT" and "missing input(s) ['item_dense']" in e.value.message()


def test_unknown_model_and_version_are_not_found(gclient):
    user, cands = make_request(10, 3)
    with pytest.raises(InferenceServerException) as e:
        gclient.infer("nope", _grpc_inputs(user, cands))
    assert _status(e.value) == "StatusCode.NOT_FOUND" and "'nope' is not loaded" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        gclient.infer(MODEL, _grpc_inputs(user, cands), model_version="7")
    assert _status(e.value) == "StatusCode.NOT_FOUND" and "version 7" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        gclient.get_model_metadata("nope")
    assert _status(e.value) == "StatusCode.NOT_FOUND"


def test_grpc_requests_count_in_the_shared_metrics(gclient, served):
    import httpx

    before = _requests_total(httpx.get(f"http://127.0.0.1:{served[0]}/metrics").text)
    user, cands = make_request(11, 2)
    _grpc_scores(gclient, user, cands)
    assert _requests_total(httpx.get(f"http://127.0.0.1:{served[0]}/metrics").text) == before + 1


def _requests_total(text: str) -> float:
    line = [ln for ln in text.splitlines() if ln.startswith(f'ugsep_requests_total{{model="{MODEL}"}}')]
    return float(line[0].split()[-1]) if line else 0.0


def test_statistics_over_grpc(gclient):
    _grpc_scores(gclient, *make_request(12, 3))
    (stats,) = gclient.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    assert stats["name"] == MODEL and int(stats["inference_count"]) >= 1
    assert int(stats["inference_stats"]["success"]["count"]) >= 1


def test_bearer_token_over_grpc(split_bundle, scorer):
    """In-process server: the gRPC port is bound in the app's lifespan (port 0: any free port)."""
    from runtime.serving import ServerThread, build_app

    app = build_app([split_bundle], token="s3cret", grpc_port=0)
    with ServerThread(app):
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{app.state.grpc_port}")
        assert client.is_server_live()  # the probes need no token
        user, cands = make_request(13, 4)
        with pytest.raises(InferenceServerException) as e:
            _grpc_scores(client, user, cands)
        assert _status(e.value) == "StatusCode.UNAUTHENTICATED"
        out = client.infer(MODEL, _grpc_inputs(user, cands), headers={"authorization": "Bearer s3cret"})
        np.testing.assert_array_equal(out.as_numpy("ctr"), scorer.score(user, cands)["ctr"])
        client.close()


def test_full_queue_is_resource_exhausted_and_accepted_requests_finish(split_bundle, scorer):
    import concurrent.futures as cf
    import time

    from runtime.serving import ServerThread, build_app

    app = build_app([split_bundle], max_queue=1, max_delay_ms=1500, grpc_port=0)
    with ServerThread(app), cf.ThreadPoolExecutor(4) as pool:
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{app.state.grpc_port}")
        first_req = make_request(1, 3)
        first = pool.submit(_grpc_scores, client, *first_req)
        time.sleep(0.5)  # the first request now waits in the queue for more company
        others = [pool.submit(_grpc_scores, client, *make_request(i, 3)) for i in range(3)]
        for f in others:
            with pytest.raises(InferenceServerException) as e:
                f.result()
            assert _status(e.value) == "StatusCode.RESOURCE_EXHAUSTED" and "overloaded" in e.value.message()
        np.testing.assert_array_equal(first.result(), scorer.score(*first_req)["ctr"])
        client.close()


def test_a_taken_grpc_port_exits_2_with_one_line(split_bundle):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ugsep = Path(sys.executable).with_name("ugsep")
        r = subprocess.run([str(ugsep), "serve", str(split_bundle), "--port", str(_free_port()), "--grpc-port",
                            str(port)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: --grpc-port {port}: cannot bind 127.0.0.1:{port} (Address already in use)")
