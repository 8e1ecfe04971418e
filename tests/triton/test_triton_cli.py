"""`ugsep triton BUNDLE --out REPO --serve`: writes the repository, serves it, stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.triton.conftest import ranking, triton_scores

pytestmark = pytest.mark.triton


def test_serve_flag_runs_tritonserver_until_interrupted(
    tmp_path, tri_bundle, tri_scorer, triton_env
):
    import tritonclient.http as th

    cmd = [
        sys.executable,
        "-m",
        "exporter.cli",
        "triton",
        str(tri_bundle),
        "--out",
        str(tmp_path / "repo"),
        "--serve",
        "--name",
        "ranker",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "UGSEP_TRITON_VENV": str(triton_env.venv)},
    )
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "tritonserver ready" in line:
                break
        found = re.search(r"http (127\.0\.0\.1:\d+)", "".join(lines))
        assert found, "".join(lines)
        client = th.InferenceServerClient(found.group(1))
        user, cands = ranking(71, 6)
        got = triton_scores(client, "ranker", [(user, cands)], binary=True)[0]
        np.testing.assert_allclose(got, tri_scorer.score(user, cands)["ctr"], rtol=0, atol=1e-5)
        client.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
