"""SIGTERM drains in-flight requests before the server process exits (a real subprocess)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from tests.serving.conftest import make_request
from tests.serving.http_utils import json_body

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the server subprocess did not become ready")


def _wait_accepted(url: str, n: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=5).text
        line = [ln for ln in text.splitlines() if ln.startswith('ugsep_requests_total{model="toysplit"}')]
        if line and float(line[0].split()[-1]) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the server did not receive {n} requests")


def start_server(bundle, *flags: str) -> tuple[subprocess.Popen, str]:
    """``python -m runtime.serving BUNDLE FLAGS`` on a free loopback port, ready; (process, url)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "runtime.serving", str(bundle), "--port", str(port), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def test_sigterm_drains_in_flight_requests(split_bundle, scorer):
    proc, url = start_server(split_bundle, "--max-delay-ms", "3000", "--latency-budget-ms", "600000",
                             "--log-level", "warning")
    try:
        reqs = [make_request(i, 5) for i in range(6)]
        with cf.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v2/models/toysplit/infer",
                                   json=json_body(*r), timeout=30) for r in reqs]
            _wait_accepted(url, len(reqs))  # every request reached the server ...
            assert not any(f.done() for f in futures)  # ... and waits in the batcher (3 s delay)
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        # uvicorn drains, then re-raises the signal: the conventional "terminated by SIGTERM"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    for (user, cands), r in zip(reqs, responses, strict=True):
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.array(r.json()["outputs"][0]["data"], np.float32),
                                      scorer.score(user, cands)["ctr"])
    try:
        httpx.get(url + "/v2/health/live", timeout=1)
        raise AssertionError("the server still answers after SIGTERM")
    except httpx.TransportError:
        pass
