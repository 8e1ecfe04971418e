"""Hypothesis fuzzing of the real server over every hostile request class: never a 5xx,
health answered throughout (benchmarks/fuzz_server.py runs 10,000+ of the same)."""

from __future__ import annotations

import collections

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.serving import ServerThread, build_app
from tests.serving.fuzz_requests import send, strategies
from tests.serving.probe import HealthProbe

MODEL = "toysplit"
PATH = f"/v2/models/{MODEL}/infer"
# a few hundred requests in the suite; the benchmark script runs 10,000+
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def served(split_bundle):
    app = build_app([split_bundle], body_timeout_s=3.0, latency_budget_ms=600_000)
    with ServerThread(app, header_timeout_s=3.0) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        meta = client.get(f"/v2/models/{MODEL}").json()
        yield srv, client, meta


@pytest.mark.slow
def test_no_request_class_gets_a_5xx_and_health_answers_throughout(served):
    srv, client, meta = served
    classes = strategies(meta)
    seen: collections.Counter = collections.Counter()
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    @FUZZ
    @given(st.sampled_from(sorted(classes)).flatmap(lambda c: classes[c]))
    def fuzz(case):
        status = send(client, srv.port, PATH, case)
        seen[case.cls] += 1
        statuses[case.cls][status] += 1
        assert status < 500, (case.cls, status, case.body[:300])
        if case.cls == "valid":
            assert status == 200
        elif case.cls == "truncated_body":
            assert status in (0, 400, 408, 413)  # the client hung up: nobody to answer, or a 4xx
        elif case.cls == "wrong_content_type":
            assert status == 415
        elif case.cls not in ("field_mutation", "binary_header_lies"):  # these may happen to be valid
            assert 400 <= status < 500, (case.cls, status, case.body[:300])

    with HealthProbe(srv.port, interval=0.05) as probe:
        fuzz()
    assert len(seen) >= 12, seen  # every class was drawn
    assert probe.samples and all(s == 200 for s, _ in probe.samples), probe.summary()
    metrics = client.get("/metrics").text
    assert 'reason="internal"' not in metrics
    assert "ugsep_client_disconnects_total" in metrics
