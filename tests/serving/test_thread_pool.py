"""``thread_pool="process"``: one ONNX Runtime intra-op pool shared by every session of the
process (runtime/backends/ort.py). The pool is process-wide state, so each case runs in its
own real subprocess: a ``ugsep serve --thread-pool process`` server hit over HTTP, and the
backend's refusals when a process mixes pool settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import httpx
import numpy as np

from tests.serving.conftest import make_request
from tests.serving.http_utils import json_body
from tests.serving.split_bundle import eager_scores
from tests.serving.test_sigterm import ROOT, start_server


def test_server_on_a_shared_pool_scores_like_eager(split_bundle, split_parts, scorer):
    proc, url = start_server(split_bundle, "--threads", "2", "--thread-pool", "process",
                             "--log-level", "warning")
    try:
        for seed, n in ((1, 1), (2, 7), (3, 64)):
            user, cands = make_request(seed, n)
            r = httpx.post(f"{url}/v2/models/toysplit/infer", json=json_body(user, cands), timeout=30)
            assert r.status_code == 200, r.text
            got = np.array(r.json()["outputs"][0]["data"], np.float32)
            want = eager_scores(*split_parts, user, cands)
            assert np.abs(got - want).max() <= 1e-5
            assert np.abs(got - scorer.score(user, cands)["ctr"]).max() <= 1e-6  # per-session pools
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_process_keeps_one_pool_size_and_one_pool_kind(split_bundle):
    got = _run(f"""
        import json
        import runtime
        from runtime.backends.ort import OrtBackend
        from runtime.errors import BackendUnavailableError
        out = {{"per_session": OrtBackend(intra_op_threads=2, thread_pool="process")
                .session_options().use_per_session_threads}}
        s = runtime.load({str(split_bundle)!r}, "onnxruntime", intra_op_threads=2, thread_pool="process")
        out["split"] = s.split
        for name, kw in (("other_size", dict(intra_op_threads=3, thread_pool="process")),
                         ("per_session_after", dict(intra_op_threads=2))):
            try:
                runtime.load({str(split_bundle)!r}, "onnxruntime", **kw)
                out[name] = None
            except BackendUnavailableError as e:
                out[name] = str(e)
        print(json.dumps(out))
        """)
    assert got["per_session"] is False and got["split"] is True
    assert "has 2 intra-op threads; a backend asked for 3" in got["other_size"]
    assert "every session must use it" in got["per_session_after"]


def test_unknown_pool_kind_is_refused():
    import pytest

    from runtime.backends.ort import OrtBackend

    with pytest.raises(ValueError, match="thread_pool must be one of"):
        OrtBackend(thread_pool="global")
