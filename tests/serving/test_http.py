"""The KServe v2 server on a real loopback port, driven by tritonclient and plain httpx."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from runtime.serving import ServerThread, build_app
from tests.serving.conftest import make_request
from tests.serving.http_utils import json_body, triton_inputs, triton_scores
from tests.serving.split_bundle import eager_scores

MODEL = "toysplit"


@pytest.fixture(scope="module")
def server(split_bundle):
    # these tests are about the protocol, not shedding (test_hardening.py): no latency budget
    with ServerThread(build_app([split_bundle], max_delay_ms=1.0, latency_budget_ms=600_000)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def tclient(server):
    return triton.InferenceServerClient(f"127.0.0.1:{server.port}")


def test_health_metadata_and_readiness(http, tclient):
    assert http.get("/v2/health/live").status_code == 200
    assert tclient.is_server_ready() and tclient.is_model_ready(MODEL)
    meta = tclient.get_model_metadata(MODEL)
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs == {
        "user_ids": ("INT64", [1, 3]), "user_dense": ("FP32", [1, 4]),
        "item_ids": ("INT64", [-1, 2]), "item_dense": ("FP32", [-1, 2]),
    }
    assert meta["outputs"] == [{"name": "ctr", "datatype": "FP32", "shape": [-1]}]
    assert http.get("/v2/models/nope").status_code == 404


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_scores_equal_scorer_and_eager(tclient, scorer, split_parts, binary):
    for seed, n in [(1, 1), (2, 17), (3, 200)]:
        user, cands = make_request(seed, n)
        got = triton_scores(tclient, MODEL, user, cands, binary)
        np.testing.assert_array_equal(got, scorer.score(user, cands)["ctr"])
        np.testing.assert_allclose(got, eager_scores(*split_parts, user, cands), rtol=1e-5, atol=1e-6)


def test_binary_output_when_the_request_asks_for_it(tclient, scorer):
    user, cands = make_request(4, 9)
    result = tclient.infer(MODEL, triton_inputs(user, cands, binary=True))  # no outputs: binary_data_output
    assert result.get_output("ctr")["parameters"]["binary_data_size"] == 9 * 4
    np.testing.assert_array_equal(result.as_numpy("ctr"), scorer.score(user, cands)["ctr"])


def test_plain_http_json_and_user_key(http, scorer):
    user, cands = make_request(5, 6)
    r = http.post(f"/v2/models/{MODEL}/infer", json={**json_body(user, cands, user_key="alice"), "id": "r1"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "r1" and out["model_name"] == MODEL
    (ctr,) = out["outputs"]
    assert ctr["datatype"] == "FP32" and ctr["shape"] == [6]
    np.testing.assert_array_equal(np.array(ctr["data"], np.float32), scorer.score(user, cands)["ctr"])


def test_concurrent_clients_get_their_own_exact_scores(server, scorer):
    reqs = [make_request(100 + i, n=1 + i % 30, user_seed=i % 5) for i in range(48)]

    def call(req):
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        return triton_scores(client, MODEL, *req, binary=True)

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, reqs))
    for (u, c), got in zip(reqs, results, strict=True):
        np.testing.assert_array_equal(got, scorer.score(u, c)["ctr"])


def test_repeat_user_hits_the_cache_and_metrics_say_so(http):
    def metric(text: str, name: str) -> float:
        line = next(ln for ln in text.splitlines() if ln.startswith(f'{name}{{model="{MODEL}"}}'))
        return float(line.split()[-1])

    before = http.get("/metrics").text
    user, cands = make_request(999, 4)
    for _ in range(3):
        assert http.post(f"/v2/models/{MODEL}/infer", json=json_body(user, cands)).status_code == 200
    after = http.get("/metrics").text
    assert metric(after, "ugsep_cache_hits_total") - metric(before, "ugsep_cache_hits_total") == 2
    assert metric(after, "ugsep_cache_misses_total") - metric(before, "ugsep_cache_misses_total") == 1
    assert metric(after, "ugsep_requests_total") - metric(before, "ugsep_requests_total") == 3

    def runs(text: str, stage: str) -> float:
        key = f'ugsep_graph_runs_total{{model="{MODEL}",stage="{stage}"}}'
        return next((float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(key)), 0.0)

    # one user-graph run (the two repeats hit the cache), one group-graph run per request
    assert runs(after, "user") - runs(before, "user") == 1
    assert runs(after, "group") - runs(before, "group") == 3
    for family in ("ugsep_request_latency_seconds_bucket", "ugsep_queue_time_seconds_bucket",
                   "ugsep_batch_users_bucket", "ugsep_batch_candidates_bucket"):
        assert family in after


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda b: b["inputs"].pop(), "missing input(s) ['item_dense']"),
        (lambda b: b["inputs"][0].update(name="user_idz"), "user_idz"),
        (lambda b: b["inputs"][0].update(datatype="FP32"), "'user_ids'"),
        (lambda b: b["inputs"][1].update(shape=[2, 2]), "'user_dense'"),
        (lambda b: b["inputs"][2].update(data=[45] * 8), "'item_ids' has id 45 outside its vocabulary [0, 40)"),
        (lambda b: b["inputs"][3].update(data=[float("nan")] * 8), "'item_dense' contains NaN"),
        (lambda b: b["inputs"][2].update(shape=[5, 2]), "'item_ids'"),
        (lambda b: b.update(outputs=[{"name": "nope"}]), "unknown output 'nope'"),
    ],
    ids=["missing", "unknown-name", "dtype", "user-shape", "vocab", "nan", "count", "output"],
)
def test_malformed_requests_get_400_naming_the_input(http, mutate, needle):
    body = json_body(*make_request(7, 4))
    mutate(body)
    r = http.post(f"/v2/models/{MODEL}/infer", content=json.dumps(body))  # json.dumps writes NaN
    assert r.status_code == 400 and needle in r.json()["error"], r.text
    assert http.get("/v2/health/ready").status_code == 200


def test_wrong_binary_sizes_and_bad_json_get_400(http):
    r = http.post(f"/v2/models/{MODEL}/infer", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    user, cands = make_request(8, 2)
    head = json_body(user, cands)
    head["inputs"][0].pop("data")
    head["inputs"][0]["parameters"] = {"binary_data_size": 3 * 8}
    raw = json.dumps(head).encode()
    r = http.post(f"/v2/models/{MODEL}/infer", content=raw + b"\0" * 20,
                  headers={"Inference-Header-Content-Length": str(len(raw))})
    assert r.status_code == 400 and "the body ends before" in r.json()["error"]
    r = http.post(f"/v2/models/{MODEL}/infer", content=raw + b"\0" * 30,
                  headers={"Inference-Header-Content-Length": str(len(raw))})
    assert r.status_code == 400 and "add up to 24" in r.json()["error"]


def test_candidate_and_body_limits(split_bundle, scorer):
    app = build_app([split_bundle], max_candidates=8, max_body_bytes=20_000)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as http:
        r = http.post(f"/v2/models/{MODEL}/infer", json=json_body(*make_request(1, 9)))
        assert r.status_code == 400 and "at most 8" in r.json()["error"]
        r = http.post(f"/v2/models/{MODEL}/infer", content=b"x" * 20_001)
        assert r.status_code == 413
        r = http.post(f"/v2/models/{MODEL}/infer", json=json_body(*make_request(1, 8)))
        assert r.status_code == 200


def test_bearer_token(split_bundle):
    with ServerThread(build_app([split_bundle], token="s3cret")) as srv, httpx.Client(base_url=srv.url) as http:
        assert http.get("/v2/health/ready").status_code == 200  # probes stay open
        body = json_body(*make_request(1, 2))
        assert http.post(f"/v2/models/{MODEL}/infer", json=body).status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = http.post(f"/v2/models/{MODEL}/infer", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_full_queue_answers_429_and_accepted_requests_finish(split_bundle, scorer):
    app = build_app([split_bundle], max_queue=1, max_delay_ms=1500)
    with ServerThread(app) as srv, cf.ThreadPoolExecutor(4) as pool:
        first_req = make_request(1, 3)
        url = f"{srv.url}/v2/models/{MODEL}/infer"
        first = pool.submit(httpx.post, url, json=json_body(*first_req), timeout=30)
        time.sleep(0.5)  # the first request now waits in the queue for more company
        others = [pool.submit(httpx.post, url, json=json_body(*make_request(i, 3)), timeout=30) for i in range(3)]
        codes = [f.result().status_code for f in others]
        assert codes == [429, 429, 429]
        r = first.result()
        assert r.status_code == 200
        np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32),
                                      scorer.score(*first_req)["ctr"])
        assert 'ugsep_request_failures_total{model="toysplit",reason="overloaded"} 3.0' in httpx.get(srv.url + "/metrics").text


def test_group_chunk_option_reaches_the_batcher_and_scores_stay_exact(split_bundle, scorer):
    with ServerThread(build_app([split_bundle])) as srv:  # ORT CPU's default
        assert srv.app.state.repo.get(MODEL).batcher.group_chunk == 256
    with ServerThread(build_app([split_bundle], group_chunk_candidates=3)) as srv:
        assert srv.app.state.repo.get(MODEL).batcher.group_chunk == 3
        req = make_request(4, 10)
        r = httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", json=json_body(*req), timeout=30)
        assert r.status_code == 200
        got = np.array(r.json()["outputs"][0]["data"], np.float32)
        np.testing.assert_array_equal(got, scorer.score(*req)["ctr"])


def test_two_bundles_are_two_models(split_bundle, other_bundle):
    with ServerThread(build_app([split_bundle, other_bundle])) as srv:
        client = triton.InferenceServerClient(f"127.0.0.1:{srv.port}")
        user, cands = make_request(2, 5)
        a = triton_scores(client, MODEL, user, cands, binary=True)
        b = triton_scores(client, "other", user, cands, binary=True)
        assert not np.array_equal(a, b)
        assert {m["name"] for m in client.get_model_repository_index()} == {MODEL, "other"}


def test_cache_bound_holds_over_http_under_distinct_users(split_bundle):
    bound = 10 * 16 * 4  # ten boundary rows of 16 float32
    with ServerThread(build_app([split_bundle], cache_bytes=bound)) as srv, httpx.Client(base_url=srv.url) as http:
        cache = srv.app.state.repo.get(MODEL).cache
        for i in range(40):
            r = http.post(f"/v2/models/{MODEL}/infer", json=json_body(*make_request(5000 + i, 3)))
            assert r.status_code == 200
            assert cache.stats().bytes <= bound
        text = http.get("/metrics").text
    assert f'ugsep_cache_max_bytes{{model="{MODEL}"}} {float(bound)}' in text
    assert f'ugsep_cache_evictions_total{{model="{MODEL}"}} 30.0' in text
