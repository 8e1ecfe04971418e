"""A server that bad clients cannot stall: timeouts, connection pressure, shedding, disconnects,
content types, parse bounds and model control, each against a real server on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import shutil
import socket
import time

import httpx
import numpy as np
import pytest

from runtime.errors import UgsepError
from runtime.serving import ServerThread, build_app
from runtime.serving.admission import Admission
from tests.serving.conftest import make_request
from tests.serving.http_utils import json_body
from tests.serving.probe import http_get_status

MODEL = "toysplit"
PATH = f"/v2/models/{MODEL}/infer"


def _raw(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(data)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _metric(text: str, name: str) -> float:
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name))


# -- slow senders, idle connections, connection pressure --------------------------------------


def test_slow_body_gets_408_and_its_connection_closed(split_bundle):
    with ServerThread(build_app([split_bundle], body_timeout_s=1.0)) as srv:
        s = _raw(srv.port, f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode() + b"{" * 10)
        reply = _read_all(s)  # returns at EOF: the server closed the connection
        s.close()
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply
        assert 'reason="timeout"} 1.0' in httpx.get(srv.url + "/metrics").text


def test_slow_headers_and_idle_connections_are_closed_and_health_answers_past_the_limit(split_bundle):
    app = build_app([split_bundle], latency_budget_ms=600_000)
    with ServerThread(app, header_timeout_s=2.0, limit_concurrency=20) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(30)]
        slowloris = _raw(srv.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
        time.sleep(0.3)
        # 31 connections are past limit_concurrency=20: uvicorn refuses work, but probes are exempt
        assert http_get_status("127.0.0.1", srv.port, "/v2/health/live")[0] == 200
        assert http_get_status("127.0.0.1", srv.port, "/v2/health/ready")[0] == 200
        assert http_get_status("127.0.0.1", srv.port, "/metrics")[0] == 200
        body = json.dumps(json_body(*make_request(1, 3))).encode()
        assert httpx.post(srv.url + PATH, content=body).status_code == 503
        for s in [*idle, slowloris]:  # the header timeout closes every one of them
            assert _read_all(s) == b""
            s.close()
        assert httpx.post(srv.url + PATH, content=body).status_code == 200


def test_bodies_in_flight_are_bounded_in_bytes(split_bundle):
    app = build_app([split_bundle], max_body_bytes=8000, max_inflight_body_bytes=8100, body_timeout_s=3.0)
    with ServerThread(app) as srv:
        holder = _raw(srv.port, f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 8000\r\n\r\n".encode())
        time.sleep(0.3)  # its 8000 declared bytes are reserved while it trickles
        body = json.dumps(json_body(*make_request(1, 3))).encode()
        r = httpx.post(srv.url + PATH, content=body)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "bytes of request bodies" in r.json()["error"]
        assert _read_all(holder).startswith(b"HTTP/1.1 408")  # the holder times out, its bytes are released
        holder.close()
        assert httpx.post(srv.url + PATH, content=body).status_code == 200


# -- admission by deadline ------------------------------------------------------------------


def test_admission_model_and_rule_with_hand_computed_figures():
    now = [0.0]
    adm = Admission(budget_s=0.05, clock=lambda: now[0])
    adm.observe(0.012, candidates=10, requests=2)  # batches cost 2 ms + 1 ms per candidate
    adm.observe(0.102, candidates=100, requests=3)
    fixed, slope = adm.model.coefficients()
    assert fixed == pytest.approx(0.002) and slope == pytest.approx(0.001)
    assert adm.check(0, 500).admitted  # an idle server admits anything
    est = adm.check(queued_candidates=30, own_candidates=10)  # 2 ms + 40 x 1 ms = 42 ms
    assert est.admitted and est.wait_s == pytest.approx(0.042)
    adm.started(1, 20)  # a batch of 20 in flight: 22 ms, 10 ms elapsed -> 12 ms left
    now[0] = 0.010
    est = adm.check(queued_candidates=30, own_candidates=10)
    assert not est.admitted and est.wait_s == pytest.approx(0.054) and est.retry_after_s == 1
    adm.finished(1)
    assert adm.check(30, 10).admitted


def test_default_budget_is_derived_from_the_lone_service_time():
    adm = Admission()
    assert adm.budget_s == float("inf")  # nothing measured yet
    adm.observe(0.040, candidates=200, requests=1)
    assert adm.budget_s == pytest.approx(0.080)
    adm.observe(0.5, candidates=4000, requests=20)  # busy batches do not move it
    assert adm.budget_s == pytest.approx(0.080)
    adm.observe(0.001, candidates=1, requests=1)  # 0.9 x 40 ms + 0.1 x 1 ms, doubled
    assert adm.budget_s == pytest.approx(2 * (0.9 * 0.040 + 0.1 * 0.001))


def test_burst_past_the_budget_is_shed_with_retry_after_and_the_admitted_are_exact(split_bundle, scorer):
    app = build_app([split_bundle], latency_budget_ms=1.0)
    reqs = [make_request(200 + i, 256) for i in range(48)]
    with ServerThread(app) as srv, cf.ThreadPoolExecutor(24) as pool:
        def post(req):
            return httpx.post(srv.url + PATH, json=json_body(*req), timeout=60)

        responses = list(pool.map(post, reqs))
        metrics = httpx.get(srv.url + "/metrics").text
    shed = [r for r in responses if r.status_code == 429]
    ok = [(req, r) for req, r in zip(reqs, responses, strict=True) if r.status_code == 200]
    assert shed and ok and len(shed) + len(ok) == len(reqs)
    for r in shed:
        assert int(r.headers["Retry-After"]) >= 1 and "latency budget of 1 ms" in r.json()["error"]
    for req, r in ok:
        np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32),
                                      scorer.score(*req)["ctr"])
    assert _metric(metrics, 'ugsep_request_failures_total{model="toysplit",reason="overloaded"}') == len(shed)


# -- disconnects, content type, parse bounds ------------------------------------------------------


def test_client_that_hangs_up_while_queued_is_counted_logged_in_one_line_and_not_run(split_bundle, caplog):
    app = build_app([split_bundle], max_delay_ms=1500, latency_budget_ms=600_000)
    with ServerThread(app) as srv, caplog.at_level(logging.INFO, logger="runtime.serving"):
        scorer = srv.app.state.repo.get(MODEL).scorer
        before = dict(scorer.stage_runs)
        body = json.dumps(json_body(*make_request(3, 4))).encode()
        s = _raw(srv.port, f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.4)  # parsed and queued: the batcher waits 1.5 s for company
        s.close()
        time.sleep(2.0)  # past the delay: the batch would have run by now
        metrics = httpx.get(srv.url + "/metrics").text
        assert dict(scorer.stage_runs) == before  # its work was cancelled, never run
    assert _metric(metrics, 'ugsep_client_disconnects_total{model="toysplit"}') == 1
    assert 'reason="internal"' not in metrics
    gone = [r for r in caplog.records if "closed the connection" in r.getMessage()]
    assert len(gone) == 1 and gone[0].exc_info is None
    assert not any(r.exc_info for r in caplog.records)


@pytest.fixture(scope="module")
def http(split_bundle):
    with ServerThread(build_app([split_bundle], latency_budget_ms=600_000)) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            yield client


@pytest.mark.parametrize("ctype, status", [
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), (None, 200),
    ("application/json; charset=utf-8", 200), ("application/octet-stream", 200),
])
def test_content_type(http, ctype, status):
    body = json.dumps(json_body(*make_request(1, 2))).encode()
    r = http.post(PATH, content=body, headers={"Content-Type": ctype} if ctype else {})
    assert r.status_code == status, r.text
    if status == 415:
        assert "Content-Type" in r.json()["error"]


def _doc(**change) -> bytes:
    body = json_body(*make_request(1, 2))
    body["inputs"][0].update(change)
    return json.dumps(body).encode()


@pytest.mark.parametrize("raw, status, needle", [
    (_doc(shape=[2] * 120_000), 400, "longer than 1024 bytes"),
    (_doc(shape=[1] * 40), 400, "40 dims"),
    (_doc(shape=[10**12, 10**12]), 400, "holds more than"),
    (_doc(data=None).replace(b"null", b"1" + b"0" * 5000), 400, "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nests 100000 levels"),
    (_doc(shape=[1, 2**80]), 400, "holds more than"),
    (_doc(name="x" * 10_000), 400, "unknown input"),
], ids=["120k-dims", "40-dims", "huge-count", "int-past-digit-limit", "deep", "huge-dim", "long-name"])
def test_parse_bounds_answer_4xx_with_a_short_message(http, raw, status, needle):
    r = http.post(PATH, content=raw)
    assert r.status_code == status and needle in r.json()["error"], r.text[:500]
    assert len(r.json()["error"]) < 400


def test_json_header_limit_is_413(split_bundle):
    with ServerThread(build_app([split_bundle], max_json_bytes=2000)) as srv:
        r = httpx.post(srv.url + PATH, json=json_body(*make_request(1, 60)))
        assert r.status_code == 413 and "binary data extension" in r.json()["error"]


# -- model control ---------------------------------------------------------------------------


def test_model_control_is_off_by_default(http):
    for action in ("load", "unload"):
        r = http.post(f"/v2/repository/models/{MODEL}/{action}", json={"parameters": {"bundle": "/etc"}})
        assert r.status_code == 403 and "--enable-model-control" in r.json()["error"]
    assert http.post(PATH, json=json_body(*make_request(1, 2))).status_code == 200


def test_model_control_needs_a_token_to_be_enabled(split_bundle):
    with pytest.raises(UgsepError, match="needs a token"):
        build_app([split_bundle], enable_model_control=True)


def test_model_control_token_and_model_root(split_bundle, split_bundle_v2, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(split_bundle_v2, root / "toysplit")
    (root / "escape").symlink_to(split_bundle.parent, target_is_directory=True)  # a link out of the root
    app = build_app([split_bundle], enable_model_control=True, control_token="k3y", model_root=str(root),
                    token="infer-token")
    good = {"Authorization": "Bearer k3y"}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as http:
        url = f"/v2/repository/models/{MODEL}"
        assert http.post(f"{url}/unload").status_code == 401
        assert http.post(f"{url}/unload", headers={"Authorization": "Bearer infer-token"}).status_code == 401
        for path in (str(split_bundle), "../outside", "escape/toysplit"):
            r = http.post(f"{url}/load", json={"parameters": {"bundle": path}}, headers=good)
            assert r.status_code == 400 and "outside the model root" in r.json()["error"], r.text
        r = http.post(f"{url}/load", json={"parameters": {"bundle": "toysplit"}}, headers=good)
        assert r.status_code == 200 and r.json()["version"] == "2"
        assert http.post(f"{url}/unload", headers=good).json()["state"] == "UNAVAILABLE"
        infer = http.post(PATH, json=json_body(*make_request(1, 2)), headers={"Authorization": "Bearer infer-token"})
        assert infer.status_code == 404
        assert http.post(f"{url}/unload", headers=good).status_code == 404


def test_cli_binds_loopback_and_maps_the_hardening_flags(monkeypatch):
    import argparse

    from runtime.serving import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["b"])
    assert args.host == "127.0.0.1"
    opts = cli.options_from_args(args)
    assert not opts.enable_model_control and opts.latency_budget_ms is None and opts.model_root is None
    monkeypatch.setenv("UGSEP_CTL", "s3")
    args = p.parse_args(["b", "--enable-model-control", "--model-control-token-env", "UGSEP_CTL",
                         "--model-root", "/srv/models", "--latency-budget-ms", "40", "--body-timeout", "5"])
    opts = cli.options_from_args(args)
    assert (opts.enable_model_control, opts.control_token, opts.model_root) == (True, "s3", "/srv/models")
    assert (opts.latency_budget_ms, opts.body_timeout_s) == (40.0, 5.0)
