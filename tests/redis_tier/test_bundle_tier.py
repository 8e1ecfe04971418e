"""A bundle's store served from a real Redis Cluster: CLI push/ls/rm, runtime.load(embeddings=…),
``ugsep serve --embeddings`` over real HTTP, scores equal to the local-store bundle."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import httpx
import numpy as np
import pytest
import torch
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

import runtime
from runtime.bundle import Bundle
from runtime.errors import BundleError, TierUnavailableError
from runtime.redis_tier import RedisTier, push
from runtime.redis_tier.store import bundle_tables, store_version
from runtime.serving import build_app
from runtime.serving.server import ServerThread
from tests.conftest import TRUST, make_toy_model
from tests.redis_tier.redis_cluster import LocalRedisCluster, require_redis_server
from tests.serving.http_utils import json_body

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


@pytest.fixture(scope="module")
def store_bundles(tmp_path_factory, toy_checkpoint):
    """The toy model exported with both tables in the store: fp32 split, int8 unsplit (each
    export costs ~10-20 s; parity skipped here: this file checks the tier against the local
    store, and fp32 against the eager model)."""
    from exporter import ExportOptions, export_bundle, load_student
    from exporter.steps.embeddings import EmbeddingsOptions

    out = {}
    for dtype in ("fp32", "int8"):
        path = tmp_path_factory.mktemp(f"store_{dtype}") / "bundle"
        opts = ExportOptions(max_candidates=64, parity=False, split=dtype == "fp32",
                             embeddings=EmbeddingsOptions(dtype=dtype, min_bytes=0))
        export_bundle(load_student(toy_checkpoint, trust=TRUST), path, opts)
        out[dtype] = path
    assert Bundle.open(out["fp32"]).manifest.embeddings.tables, "the toy tables did not leave the graphs"
    return out


def _request(seed: int, n: int = 12, items: np.ndarray | None = None):
    rng = np.random.default_rng(seed)
    user = {"user_ids": rng.integers(0, 50, (1, 2)), "user_dense": rng.standard_normal((1, 3)).astype(np.float32)}
    ids = rng.integers(0, 40, (n, 2)) if items is None else items
    cands = {"item_ids": ids.astype(np.int64), "item_dense": rng.standard_normal((len(ids), 1)).astype(np.float32)}
    return user, cands


def _eager(user, cands):
    model = make_toy_model()
    n = len(cands["item_ids"])
    with torch.no_grad():
        return model(*(torch.from_numpy(np.repeat(v, n, 0) if k.startswith("user") else v)
                       for k, v in {**user, **cands}.items())).numpy()


def _ugsep(*args):
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def test_cli_push_then_scores_equal_the_local_store(store_bundles, redis_cluster):
    url = redis_cluster.url
    for dtype, path in store_bundles.items():
        r = _ugsep("embeddings", "push", str(path), "--redis", url)
        assert r.returncode == 0, r.stdout + r.stderr
        version = store_version(Bundle.open(path))
        assert f"pushed version {version}" in r.stdout
        local = runtime.load(path, "onnxruntime", allow_unverified=True)
        tiered = runtime.load(path, "onnxruntime", allow_unverified=True, embeddings=url,
                              embeddings_cache_bytes=1 << 20)
        for seed in range(4):
            user, cands = _request(seed)
            want, got = local.score(user, cands)["ctr"], tiered.score(user, cands)["ctr"]
            assert np.abs(got - want).max() == 0, f"{dtype}: Redis tier != local store"
            if dtype == "fp32":
                np.testing.assert_allclose(got, _eager(user, cands), atol=1e-5)
    ls = _ugsep("embeddings", "ls", "--redis", url)
    assert ls.returncode == 0 and all(store_version(Bundle.open(p))[:20] in ls.stdout for p in store_bundles.values())
    bad = _ugsep("embeddings", "rm", "nosuchversion", "--redis", url)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "holds no version nosuchversion" in bad.stderr
    bad = _ugsep("embeddings", "push", str(store_bundles["fp32"]), "--redis", "redis://127.0.0.1:1")
    assert bad.returncode == 2 and "embedding tier redis://127.0.0.1:1 unavailable" in bad.stderr
    rm = _ugsep("embeddings", "rm", store_version(Bundle.open(store_bundles["int8"])), "--redis", url)
    assert rm.returncode == 0, rm.stdout


def test_server_waits_for_its_version_then_serves_local_scores(store_bundles, redis_cluster):
    """The int8 bundle's version is not in the cluster (only fp32's is): not ready, 503 naming
    the version; once pushed the model loads by itself and scores equal the local int8 path."""
    path, url = store_bundles["int8"], redis_cluster.url
    version = store_version(Bundle.open(path))
    assert not _has(url, version), "the int8 version is already in the cluster"
    with pytest.raises(TierUnavailableError, match=f"holds no version {version}"):
        runtime.load(path, "onnxruntime", allow_unverified=True, embeddings=url)
    local = runtime.load(path, "onnxruntime", allow_unverified=True)
    app = build_app([path], allow_unverified=True, embeddings=url, grpc_port=0)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http, \
            grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert http.get("/v2/health/ready").status_code == 503
        user, cands = _request(7)
        r = http.post("/v2/models/toy/infer", json=json_body(user, cands))
        assert r.status_code == 503 and f"holds no version {version}" in r.json()["error"]
        assert "is loading" in r.json()["error"] and r.headers["Retry-After"] == "2"
        assert http.get("/v2/models/toy/ready").status_code == 503
        # gRPC: UNAVAILABLE (was NOT_FOUND), the same message, retry-after in the trailing metadata
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(_grpc_request(user, cands), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (e.value.code(), e.value.details())
        assert e.value.details() == r.json()["error"]
        assert dict(e.value.trailing_metadata())["retry-after"] == "2"
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="toy"), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "is loading" in e.value.details()
        assert not stub.ModelReady(pb.ModelReadyRequest(name="toy"), timeout=30).ready
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        push(url, bundle_tables(Bundle.open(path)), version)
        deadline = time.monotonic() + 30
        while http.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http.get("/v2/health/ready").status_code == 200
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        for seed in range(3):
            user, cands = _request(seed)
            r = http.post("/v2/models/toy/infer", json=json_body(user, cands))
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()["outputs"][0]["data"], np.float32)
            assert np.abs(got - local.score(user, cands)["ctr"]).max() == 0
            out = stub.ModelInfer(_grpc_request(user, cands), timeout=30)
            assert np.abs(np.frombuffer(out.raw_output_contents[0], "<f4") - local.score(user, cands)["ctr"]).max() == 0
        metrics = http.get("/metrics").text
        assert 'ugsep_embedding_cache_misses_total{model="toy"}' in metrics
        assert 'ugsep_embedding_tier_fetches_total{model="toy"}' in metrics


def _grpc_request(user: dict, cands: dict) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="toy")
    for k, v in {**user, **cands}.items():
        v = np.ascontiguousarray(v, np.int64 if v.dtype.kind == "i" else np.float32)
        req.inputs.add(name=k, datatype="INT64" if v.dtype == np.int64 else "FP32", shape=list(v.shape))
        req.raw_input_contents.append(v.tobytes())
    return req


def _has(url: str, version: str) -> bool:
    try:
        RedisTier.open(url, version).close()
        return True
    except TierUnavailableError:
        return False


def test_node_killed_under_http_503s_its_rows_serves_cached_and_recovers(store_bundles, tmp_path):
    require_redis_server()
    cluster = LocalRedisCluster(tmp_path / "redis", masters=3).start()
    try:
        path = store_bundles["fp32"]
        push(cluster.url, bundle_tables(Bundle.open(path)), store_version(Bundle.open(path)))
        local = runtime.load(path, "onnxruntime", allow_unverified=True)
        app = build_app([path], allow_unverified=True, embeddings=cluster.url, grpc_port=0)
        warm = _request(1, items=np.array([[0, 1], [2, 3]]))
        cold = _request(1, items=np.arange(4, 40).reshape(-1, 2))   # every other item: all buckets
        with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
            def infer(req):
                return http.post("/v2/models/toy/infer", json=json_body(*req))

            # the server's warm-up requests sampled ids into the hot cache: start it empty,
            # so only the warm request's rows are cached when the node dies
            app.state.repo.models["toy"].scorer.store.store.tier.cache.clear()
            assert infer(warm).status_code == 200                     # its rows now in the hot cache
            cluster.kill(cluster.master_ports()[0])
            t0 = time.monotonic()
            r = infer(cold)
            assert r.status_code == 503 and "embedding tier redis://127.0.0.1" in r.json()["error"]
            assert time.monotonic() - t0 < 5.0
            with grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:  # was INTERNAL
                with pytest.raises(grpc.RpcError) as e:
                    pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_grpc_request(*cold), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (e.value.code(), e.value.details())
            assert "embedding tier redis://127.0.0.1" in e.value.details()
            assert dict(e.value.trailing_metadata())["retry-after"] == "1"
            r = infer(warm)
            assert r.status_code == 200
            assert np.abs(np.asarray(r.json()["outputs"][0]["data"], np.float32) - local.score(*warm)["ctr"]).max() == 0
            cluster.restart(next(p for p in cluster.ports if p not in cluster.procs))
            cluster.wait_ok()
            deadline = time.monotonic() + 20
            while (r := infer(cold)).status_code == 503 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert r.status_code == 200
            assert np.abs(np.asarray(r.json()["outputs"][0]["data"], np.float32) - local.score(*cold)["ctr"]).max() == 0
    finally:
        cluster.stop()


@pytest.mark.triton
def test_triton_cpu_repository_reads_the_same_cluster(store_bundles, redis_cluster, tmp_path):
    """`ugsep triton --embeddings`: the Python-backend model looks rows up in the cluster;
    scores over tritonclient equal the local-store scorer's exactly."""
    from runtime.triton import write_repository
    from runtime.triton.env import ensure_triton_env
    from runtime.triton.server import TritonServer
    from tests.triton.conftest import triton_scores

    path, url = store_bundles["fp32"], redis_cluster.url
    push(url, bundle_tables(Bundle.open(path)), store_version(Bundle.open(path)))   # idempotent
    local = runtime.load(path, "onnxruntime", allow_unverified=True)
    repo = write_repository(path, tmp_path / "repo", "cpu", allow_unverified=True, intra_op_threads=1,
                            embeddings=url, embeddings_cache_bytes=1 << 20)
    with TritonServer(repo.root, ensure_triton_env()) as server:
        import tritonclient.http as th

        client = th.InferenceServerClient(server.http_url)
        for seed in range(3):
            user, cands = _request(seed)
            got = triton_scores(client, repo.model_name, [(user, cands)], binary=True)[0]
            assert np.abs(got - local.score(user, cands)["ctr"]).max() == 0
        client.close()
    with pytest.raises(BundleError, match="--kind cpu only"):
        write_repository(path, tmp_path / "repo2", "gpu", allow_unverified=True, embeddings=url)
