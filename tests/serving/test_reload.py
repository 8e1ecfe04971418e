"""Reloading a bundle in place under load: verified, warmed, swapped atomically, zero failures."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import runtime
from runtime.serving import ServerThread, build_app
from tests.serving.conftest import make_request
from tests.serving.http_utils import json_body

MODEL = "toysplit"
TOKEN = "c0ntrol"


def _control_app(*bundles, root, **options):
    """A server with model control enabled, its token, and a model root over the test bundles."""
    return build_app(list(bundles), enable_model_control=True, control_token=TOKEN, model_root=str(root), **options)


def _root(*paths) -> Path:
    return Path(os.path.commonpath([str(p) for p in paths]))


def _load(http: httpx.Client, bundle=None) -> httpx.Response:
    body = {"parameters": {"bundle": str(bundle)}} if bundle else {}
    return http.post(f"/v2/repository/models/{MODEL}/load", json=body, timeout=120,
                     headers={"Authorization": f"Bearer {TOKEN}"})


def test_reload_under_load_fails_no_request(split_bundle, split_bundle_v2):
    scorers = {"v1": runtime.load(split_bundle, "onnxruntime"), "v2": runtime.load(split_bundle_v2, "onnxruntime")}
    expected_by_version = {"1": "v1", "2": "v2", "3": "v1"}
    results, stop = [], threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            for i in range(400):  # bounded even if the reloads hang
                if stop.is_set():
                    return
                user, cands = make_request(worker * 1000 + i, n=1 + i % 20, user_seed=i % 6)
                r = http.post(f"/v2/models/{MODEL}/infer", json=json_body(user, cands))
                results.append((r, user, cands))

    app = _control_app(split_bundle, root=_root(split_bundle, split_bundle_v2), max_delay_ms=1.0,
                       latency_budget_ms=600_000)  # zero failures asked: no shedding on a loaded machine
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as http:
        threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        _wait_for_more(results, 10)
        assert _load(http, split_bundle_v2).json()["version"] == "2"
        _wait_for_more(results, 10)
        assert _load(http, split_bundle).json()["version"] == "3"
        _wait_for_more(results, 10)
        stop.set()
        for t in threads:
            t.join()
    assert len(results) > 20
    failed = [(r.status_code, r.text) for r, _, _ in results if r.status_code != 200]
    assert failed == []
    seen = set()
    for r, user, cands in results:
        version = r.json()["model_version"]
        seen.add(version)
        want = scorers[expected_by_version[version]].score(user, cands)["ctr"]
        np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32), want)
    assert {"1", "3"} <= seen


def _wait_for_more(results: list, n: int, timeout_s: float = 60.0) -> None:
    """Let the load run until ``n`` more responses arrived (bounded), whatever the machine's speed."""
    target, deadline = len(results) + n, time.monotonic() + timeout_s
    while len(results) < target and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture
def tampered(split_bundle_v2, tmp_path):
    bad = shutil.copytree(split_bundle_v2, tmp_path / "tampered")
    with open(bad / "group.onnx", "ab") as f:
        f.write(b"\0")
    return bad


def test_reload_refuses_unverified_or_foreign_bundles_and_keeps_serving(split_bundle, tampered, other_bundle, tmp_path):
    app = _control_app(split_bundle, root=_root(split_bundle, tampered, other_bundle, tmp_path))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as http:
        r = _load(http, tampered)
        assert r.status_code == 400 and "does not match its manifest sha256" in r.json()["error"]
        r = _load(http, tmp_path / "missing")
        assert r.status_code == 400 and "neither a directory" in r.json()["error"]
        r = _load(http, other_bundle)
        assert r.status_code == 400 and "holds model 'other'" in r.json()["error"]
        r = http.post(f"/v2/models/{MODEL}/infer", json=json_body(*make_request(1, 3)))
        assert r.status_code == 200 and r.json()["model_version"] == "1"
