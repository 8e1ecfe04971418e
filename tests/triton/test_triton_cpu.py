"""The CPU repository on a real tritonserver (the nvidia-pytriton binary, Python backend).

Scores come back through tritonclient (JSON and binary tensors) and must equal the
runtime scorer and the eager torch model within 1e-5, and the same ranking through
`ugsep serve` (runtime.serving) must give the same scores.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.triton import write_repository
from runtime.triton.server import TritonServer
from tests.serving.split_bundle import eager_scores
from tests.triton.conftest import ranking, student_eager, student_ranking, triton_scores

pytestmark = pytest.mark.triton
TOL = 1e-5


@pytest.fixture(scope="module")
def cpu_server(tmp_path_factory, tri_bundle, student_bundle, triton_env):
    root = tmp_path_factory.mktemp("cpu_repo")
    write_repository(student_bundle[2], root, "cpu", model_name="student", intra_op_threads=1)
    repo = write_repository(
        tri_bundle,
        root,
        "cpu",
        max_queue_delay_us=20_000,
        intra_op_threads=1,
        max_batch_candidates=16,  # small, so merged batches are also chunked
    )
    with TritonServer(repo.root, triton_env) as server:
        yield server


@pytest.fixture(scope="module")
def client(cpu_server):
    import tritonclient.http as th

    c = th.InferenceServerClient(cpu_server.http_url, concurrency=8)
    yield c
    c.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_scores_match_runtime_and_eager(client, tri_scorer, tri_parts, binary):
    user, cands = ranking(1, 9)
    got = triton_scores(client, "toysplit", [(user, cands)], binary)
    assert got.shape == (1, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], tri_scorer.score(user, cands)["ctr"], rtol=0, atol=TOL)
    np.testing.assert_allclose(got[0], eager_scores(*tri_parts, user, cands), rtol=0, atol=TOL)


def test_exported_student_scores_match_eager_model(client, student_bundle):
    """The RankMixer student from the real exporter (split, parity-checked) on Triton."""
    import runtime

    model, spec, bundle = student_bundle
    scorer = runtime.load(bundle, "onnxruntime")
    assert scorer.split and len(scorer.boundary_names) > 1
    out = spec.outputs[0]
    for binary in (False, True):
        for seed, n in ((1, 1), (3, 7), (5, 30)):
            user, cands = student_ranking(spec, seed, n)
            got = triton_scores(client, "student", [(user, cands)], binary, output=out)[0]
            np.testing.assert_allclose(got, scorer.score(user, cands)[out], rtol=0, atol=TOL)
            np.testing.assert_allclose(
                got, student_eager(model, spec, user, cands), rtol=0, atol=TOL
            )


def test_one_request_with_several_rankings(client, tri_parts):
    rankings = [ranking(s, 5) for s in (2, 3, 4)]
    got = triton_scores(client, "toysplit", rankings, binary=True)
    assert got.shape == (3, 5)
    for row, (user, cands) in zip(got, rankings, strict=True):
        np.testing.assert_allclose(row, eager_scores(*tri_parts, user, cands), rtol=0, atol=TOL)


def test_concurrent_requests_with_different_n_are_batched_and_exact(client, cpu_server, tri_scorer):
    """Ragged dynamic batching: requests of 1..12 candidates share execute() calls."""
    from tests.triton.conftest import triton_inputs

    rankings = [ranking(100 + s, 1 + s % 12) for s in range(24)]
    # tritonclient.http is gevent-based: async_infer is its way to have requests in flight
    pending = [client.async_infer("toysplit", triton_inputs([r], True)) for r in rankings]
    results = [p.get_result().as_numpy("ctr") for p in pending]
    for got, (user, cands) in zip(results, rankings, strict=True):
        np.testing.assert_allclose(got[0], tri_scorer.score(user, cands)["ctr"], rtol=0, atol=TOL)
    stats = client.get_inference_statistics("toysplit")["model_stats"][0]
    # more inferences than executions: Triton merged requests into one execute()
    assert stats["inference_count"] > stats["execution_count"]


def test_bad_input_is_that_requests_error_and_the_server_keeps_serving(client, tri_scorer):
    from tritonclient.utils import InferenceServerException

    user, cands = ranking(7, 4)
    bad = {**cands, "item_ids": np.full_like(cands["item_ids"], 999)}
    with pytest.raises(InferenceServerException, match=r"item_ids.*999.*vocabulary") as err:
        triton_scores(client, "toysplit", [(user, bad)], binary=False)
    assert err.value.status() == "400"  # INVALID_ARG: the client's fault, not the server's
    too_many = ranking(8, 65)  # limits.max_candidates is 64
    with pytest.raises(InferenceServerException, match="65"):
        triton_scores(client, "toysplit", [too_many], binary=True)
    got = triton_scores(client, "toysplit", [(user, cands)], binary=True)
    np.testing.assert_allclose(got[0], tri_scorer.score(user, cands)["ctr"], rtol=0, atol=TOL)


def test_same_scores_as_ugsep_serve(client, tri_bundle):
    """One ranking through Triton and through runtime.serving (`ugsep serve`): same scores."""
    import tritonclient.http as th

    from runtime.serving import ServerThread, build_app
    from tests.serving.http_utils import triton_scores as serve_scores

    user, cands = ranking(11, 17)
    via_triton = triton_scores(client, "toysplit", [(user, cands)], binary=True)[0]
    with ServerThread(build_app([tri_bundle])) as srv:
        c = th.InferenceServerClient(srv.url.removeprefix("http://"))
        via_serve = serve_scores(c, "toysplit", user, cands, binary=True)
        c.close()
    np.testing.assert_allclose(via_triton, via_serve, rtol=0, atol=TOL)


def _ugsep_metrics(server) -> dict[str, float]:
    import urllib.request

    body = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return {
        line.split("{")[0]: float(line.split()[-1])
        for line in body.splitlines()
        if line.startswith("ugsep_") and 'model="toysplit"' in line
    }


def test_metrics_count_rankings_and_user_cache_hits(client, cpu_server):
    before = _ugsep_metrics(cpu_server)
    user, cands = ranking(4242, 6)
    for _ in range(2):  # the same user twice: the second is a user-cache hit
        triton_scores(client, "toysplit", [(user, cands)], binary=True)
    after = _ugsep_metrics(cpu_server)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["ugsep_rankings_total"] == 2 and delta["ugsep_candidates_total"] == 12
    assert delta["ugsep_users_total"] == 2 and delta["ugsep_user_graph_rows_total"] == 1
    assert after["ugsep_user_cache_bytes"] > 0


def test_server_binds_loopback_and_stops(cpu_server):
    import urllib.request

    body = urllib.request.urlopen(cpu_server.metrics_url, timeout=5).read().decode()
    assert 'nv_inference_request_success{model="toysplit"' in body
    assert cpu_server.http_url.startswith("127.0.0.1:") and cpu_server.running
