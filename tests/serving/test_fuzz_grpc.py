"""Hypothesis fuzzing of the real gRPC endpoint over every hostile call class: each call gets the
documented status of its class, never INTERNAL/UNKNOWN, and health (gRPC and HTTP) answers
throughout (benchmarks/fuzz_server.py runs 10,000+ of the same)."""

from __future__ import annotations

import collections

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.serving import ServerThread, build_app
from tests.serving.conftest import make_request
from tests.serving.fuzz_grpc import GrpcSender, strategies, to_request
from tests.serving.probe import GrpcHealthProbe, HealthProbe

MODEL = "toysplit"
MAX_MESSAGE = 1 << 20
# a few hundred calls in the suite; the benchmark script runs 10,000+
FUZZ = settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def served(split_bundle):
    app = build_app([split_bundle], grpc_port=0, max_body_bytes=MAX_MESSAGE, latency_budget_ms=600_000)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        meta = client.get(f"/v2/models/{MODEL}").json()
        yield srv, app.state.grpc_port, client, meta


@pytest.mark.slow
def test_every_grpc_call_class_gets_its_documented_status_and_health_answers(served, scorer):
    srv, gport, client, meta = served
    classes = strategies(meta, MAX_MESSAGE)
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    sender = GrpcSender(gport)

    @FUZZ
    @given(st.sampled_from(sorted(classes)).flatmap(lambda c: classes[c]))
    def fuzz(case):
        status = sender.send(case)
        statuses[case.cls][status] += 1
        assert status not in ("INTERNAL", "UNKNOWN"), (case.cls, status, str(case.request)[:300])
        assert status in case.expect, (case.cls, status, str(case.request)[:300])

    try:
        with HealthProbe(srv.port, interval=0.05) as http_probe, GrpcHealthProbe(gport, interval=0.05) as probe:
            fuzz()
            sender.close()  # the slow clients have hung up
    finally:
        sender.channel.close()
    assert len(statuses) >= 13, dict(statuses)  # (nearly) every class was drawn
    assert statuses["grpc_valid"]["OK"] >= 1
    assert probe.samples and all(s == 1 for s, _ in probe.samples), probe.summary()
    assert http_probe.samples and all(s == 200 for s, _ in http_probe.samples), http_probe.summary()
    assert 'reason="internal"' not in client.get("/metrics").text
    user, cands = make_request(21, 7)  # and the server still scores exactly
    out = GrpcSender(gport).stub.ModelInfer(to_request(MODEL, _inputs(user, cands)), timeout=30)
    np.testing.assert_array_equal(np.frombuffer(out.raw_output_contents[0], "<f4"), scorer.score(user, cands)["ctr"])


def _inputs(user: dict, cands: dict) -> list[dict]:
    return [{"name": k, "shape": list(v.shape), "datatype": "INT64" if v.dtype == np.int64 else "FP32",
             "data": v.reshape(-1).tolist()} for k, v in {**user, **cands}.items()]
