"""The GPU repository: BLS orchestrator + user/group stage models.

On this CPU machine the same topology runs on the pytriton tritonserver with the stage
graphs in the Python backend (``stage_backend="python"``): the orchestrator, its BLS
calls, the one-user-call/one-group-call batching and the user cache are all real.
Where a GPU and a full Triton install (onnxruntime backend) exist, the ``gpu`` test
loads the onnxruntime-backend repository as written for fleets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from runtime.triton import write_repository
from runtime.triton.server import TritonServer
from tests.serving.split_bundle import eager_scores
from tests.triton.conftest import (
    ranking,
    student_eager,
    student_ranking,
    toy_eager,
    toy_ranking,
    triton_inputs,
    triton_scores,
)

TOL = 1e-5


def _stats(client, model: str) -> dict:
    return client.get_inference_statistics(model)["model_stats"][0]


@pytest.fixture(scope="module")
def bls_server(tmp_path_factory, tri_bundle, toy_bundle, student_bundle, triton_env):
    root = tmp_path_factory.mktemp("bls_repo")
    write_repository(student_bundle[2], root, "gpu", stage_backend="python", model_name="student")
    # an unsplit bundle (full.onnx only; no parity record): models "toy" + "toy_full"
    write_repository(toy_bundle, root, "gpu", stage_backend="python", allow_unverified=True)
    repo = write_repository(
        tri_bundle,
        root,
        "gpu",
        stage_backend="python",
        max_queue_delay_us=20_000,
    )
    with TritonServer(repo.root, triton_env) as server:
        yield server


@pytest.fixture(scope="module")
def bls_client(bls_server):
    import tritonclient.http as th

    c = th.InferenceServerClient(bls_server.http_url, concurrency=8)
    yield c
    c.close()


@pytest.mark.triton
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_bls_scores_match_runtime_and_eager(bls_client, tri_scorer, tri_parts, binary):
    rankings = [ranking(s, 6) for s in (21, 22)]
    got = triton_scores(bls_client, "toysplit", rankings, binary)
    for row, (user, cands) in zip(got, rankings, strict=True):
        np.testing.assert_allclose(row, tri_scorer.score(user, cands)["ctr"], rtol=0, atol=TOL)
        np.testing.assert_allclose(row, eager_scores(*tri_parts, user, cands), rtol=0, atol=TOL)


@pytest.mark.triton
def test_exported_student_through_bls_matches_eager(bls_client, student_bundle):
    """Several 3-D/4-D boundary tensors travel from the user model to the group model."""
    model, spec, _ = student_bundle
    rankings = [student_ranking(spec, 80 + s, 3 + 4 * s) for s in range(3)]
    pending = [bls_client.async_infer("student", triton_inputs([r], True)) for r in rankings]
    for p, (user, cands) in zip(pending, rankings, strict=True):
        got = p.get_result().as_numpy(spec.outputs[0])[0]
        np.testing.assert_allclose(got, student_eager(model, spec, user, cands), rtol=0, atol=TOL)


@pytest.mark.triton
def test_unsplit_bundle_runs_the_full_graph_through_bls(bls_client, toy_bundle):
    """No split: one full-graph model; the orchestrator repeats user rows per candidate."""
    import runtime

    scorer = runtime.load(toy_bundle, "onnxruntime", allow_unverified=True)
    assert not scorer.split
    rankings = [toy_ranking(60 + s, 2 + s) for s in range(3)]
    got = triton_scores(bls_client, "toy", rankings[:1], binary=False)[0]
    np.testing.assert_allclose(got, toy_eager(*rankings[0]), rtol=0, atol=TOL)
    pending = [bls_client.async_infer("toy", triton_inputs([r], True)) for r in rankings]
    for p, (user, cands) in zip(pending, rankings, strict=True):
        got = p.get_result().as_numpy("ctr")[0]
        np.testing.assert_allclose(got, scorer.score(user, cands)["ctr"], rtol=0, atol=TOL)
        np.testing.assert_allclose(got, toy_eager(user, cands), rtol=0, atol=TOL)


@pytest.mark.triton
def test_one_user_call_per_batch_and_cached_users_skip_it(bls_client, tri_scorer):
    """A batch of rankings -> one call to each stage model; a repeat user -> none to the user model."""
    before = {m: _stats(bls_client, m) for m in ("toysplit", "toysplit_user", "toysplit_group")}
    rankings = [ranking(200 + s, 3 + s % 5) for s in range(16)]
    pending = [bls_client.async_infer("toysplit", triton_inputs([r], True)) for r in rankings]
    for p, (user, cands) in zip(pending, rankings, strict=True):
        got = p.get_result().as_numpy("ctr")[0]
        np.testing.assert_allclose(got, tri_scorer.score(user, cands)["ctr"], rtol=0, atol=TOL)
    after = {m: _stats(bls_client, m) for m in before}
    runs = {m: int(after[m]["execution_count"]) - int(before[m]["execution_count"]) for m in before}
    assert runs["toysplit_user"] == runs["toysplit_group"] == runs["toysplit"] < len(rankings)

    user, cands = rankings[0]  # the same user again, new candidates: served from the cache
    again = ranking(999, 4)[1]
    u0 = int(_stats(bls_client, "toysplit_user")["inference_count"])
    g0 = int(_stats(bls_client, "toysplit_group")["inference_count"])
    got = triton_scores(bls_client, "toysplit", [(user, again)], binary=True)[0]
    np.testing.assert_allclose(got, tri_scorer.score(user, again)["ctr"], rtol=0, atol=TOL)
    assert int(_stats(bls_client, "toysplit_user")["inference_count"]) == u0
    assert int(_stats(bls_client, "toysplit_group")["inference_count"]) == g0 + 1


@pytest.mark.triton
def test_bls_bad_input_names_the_input(bls_client):
    from tritonclient.utils import InferenceServerException

    user, cands = ranking(31, 3)
    bad = {**user, "user_ids": np.full_like(user["user_ids"], -1)}
    with pytest.raises(InferenceServerException, match=r"user_ids.*-1"):
        triton_scores(bls_client, "toysplit", [(bad, cands)], binary=True)


def _gpu_triton() -> tuple[Path, Path] | str:
    """(tritonserver binary, backend dir with onnxruntime) or the reason to skip."""
    if (
        shutil.which("nvidia-smi") is None
        or subprocess.run(["nvidia-smi"], capture_output=True).returncode
    ):
        return "no NVIDIA GPU on this machine (nvidia-smi absent or failing)"
    home = Path(os.environ.get("UGSEP_TRITON_HOME", "/opt/tritonserver"))
    if (
        not (home / "bin" / "tritonserver").is_file()
        or not (home / "backends" / "onnxruntime").is_dir()
    ):
        return (
            f"no Triton install with the onnxruntime backend at {home} (set UGSEP_TRITON_HOME; "
            "the nvidia-pytriton wheel ships only the Python backend)"
        )
    return home / "bin" / "tritonserver", home / "backends"


def gpu_server(repo_root) -> TritonServer:
    """A tritonserver with the onnxruntime backend for a gpu repository (skips without a GPU)."""
    found = _gpu_triton()
    if isinstance(found, str):
        pytest.skip(found)
    binary, backends = found
    return TritonServer(repo_root, binary=binary, backend_dir=backends, environ=dict(os.environ))


@pytest.mark.gpu
def test_gpu_repository_loads_and_scores_on_a_gpu(tmp_path, tri_bundle, tri_scorer):
    import tritonclient.http as th

    repo = write_repository(tri_bundle, tmp_path / "repo", "gpu")
    with gpu_server(repo.root) as server:
        client = th.InferenceServerClient(server.http_url)
        for m in repo.models:
            assert client.is_model_ready(m), server.log_tail()
        user, cands = ranking(41, 8)
        got = triton_scores(client, "toysplit", [(user, cands)], binary=True)[0]
        np.testing.assert_allclose(got, tri_scorer.score(user, cands)["ctr"], rtol=0, atol=1e-4)


@pytest.mark.triton
def test_user_key_parameter_reuses_the_cached_user(bls_client, tri_scorer):
    """`user_key` (a request parameter, as in `ugsep serve`) keys the user cache explicitly."""
    import tritonclient.http as th

    user, cands = ranking(51, 5)
    outputs = [th.InferRequestedOutput("ctr", binary_data=True)]

    def infer(u, c):
        r = bls_client.infer(
            "toysplit",
            triton_inputs([(u, c)], True),
            outputs=outputs,
            parameters={"user_key": "alice"},
        )
        return r.as_numpy("ctr")[0]

    first = infer(user, cands)
    np.testing.assert_allclose(first, tri_scorer.score(user, cands)["ctr"], rtol=0, atol=TOL)
    calls = int(_stats(bls_client, "toysplit_user")["inference_count"])
    other_user = ranking(52, 1)[0]  # different features, same key: the cached user is used
    second = infer(other_user, cands)
    np.testing.assert_allclose(second, first, rtol=0, atol=TOL)
    assert int(_stats(bls_client, "toysplit_user")["inference_count"]) == calls
