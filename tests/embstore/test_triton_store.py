"""`ugsep triton` with a store bundle, both kinds.

cpu: the repository carries the whole bundle (its runtime does the lookups); scores on a
real tritonserver == eager. gpu: the stage models take the looked-up vectors (no tables
in them), the BLS orchestrator carries the store file and looks rows up before each stage
call; run on a real tritonserver with the stage graphs in the Python backend (how the gpu
topology runs on a CPU-only machine) == eager; the onnxruntime-backend repository as
written for GPUs is checked file by file, and loaded on a GPU only where one exists.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from exporter import ExportOptions, LoadedModel, export_bundle
from exporter.steps.capture import to_torch_inputs
from exporter.steps.embeddings import EmbeddingsOptions
from runtime.sample import sample_requests
from runtime.spec import FeatureSpec
from runtime.triton import write_repository
from runtime.triton.config import parse
from runtime.triton.server import TritonServer
from tests.embstore.models import V, make_toy_lookups, toy_spec
from tests.triton.conftest import triton_scores

pytestmark = [pytest.mark.triton, pytest.mark.slow]
SPEC = FeatureSpec.from_dict(toy_spec())


def _rankings(n_req: int, n: int, seed: int):
    rows, rid = sample_requests(SPEC, n_req, n, seed=seed)
    rankings = [({s.name: rows[s.name][rid == r][:1] for s in SPEC.user_inputs},
                 {s.name: rows[s.name][rid == r] for s in SPEC.group_inputs}) for r in range(n_req)]
    return rows, rankings


def _eager(model, rows, shape):
    with torch.no_grad():
        return model(**to_torch_inputs(SPEC, rows)).numpy().reshape(shape)


@pytest.fixture(scope="module")
def model():
    return make_toy_lookups()


@pytest.fixture(scope="module")
def split_store_bundle(tmp_path_factory, model):
    bundle = tmp_path_factory.mktemp("tri_store") / "b"
    export_bundle(LoadedModel(spec=SPEC, module=model), bundle,
                  ExportOptions(parity_rows=200, embeddings=EmbeddingsOptions(min_bytes=4096)))
    return bundle


def test_cpu_repository_serves_a_store_bundle(tmp_path, triton_env, model):
    bundle = tmp_path / "b"
    export_bundle(LoadedModel(spec=SPEC, module=model), bundle,
                  ExportOptions(split=False, parity_rows=200, embeddings=EmbeddingsOptions(min_bytes=4096)))
    repo = write_repository(bundle, tmp_path / "repo", "cpu", intra_op_threads=1)
    assert (repo.root / repo.models[0] / "1" / "bundle" / "embeddings.safetensors").is_file()
    rows, rankings = _rankings(3, 7, seed=2)
    import tritonclient.http as th

    with TritonServer(repo.root, triton_env) as server:
        client = th.InferenceServerClient(server.http_url)
        got = triton_scores(client, repo.model_name, rankings, True)
        client.close()
    np.testing.assert_allclose(got, _eager(model, rows, (3, 7)), rtol=0, atol=1e-6)


def test_gpu_repository_files_for_a_store_bundle(tmp_path, split_store_bundle):
    """As written for a GPU fleet (onnxruntime-backend stage models): the stage models hold
    the graphs only and take the looked-up vectors; the orchestrator holds the store."""
    m = json.loads((split_store_bundle / "manifest.json").read_text())
    lookups = m["embeddings"]["lookups"]
    ids = {lk["input"] for lk in lookups}
    repo = write_repository(split_store_bundle, tmp_path / "repo", "gpu")
    name = repo.model_name
    assert repo.models == [name, f"{name}_user", f"{name}_group"]
    for stage in ("user", "group"):
        cfg = parse((repo.root / f"{name}_{stage}" / "config.pbtxt").read_text())
        assert cfg.backend == "onnxruntime"
        inputs = {i.name for i in cfg.input}
        assert inputs == set(m["stages"][stage]["inputs"])
        assert {lk["stage_input"] for lk in lookups if lk["side"] == stage} <= inputs
        assert not ids & inputs  # ids never reach a stage model: the orchestrator looks them up
        assert sorted(os.listdir(repo.root / f"{name}_{stage}" / "1")) == ["model.onnx"]
    entry = parse((repo.root / name / "config.pbtxt").read_text())
    assert {i.name for i in entry.input} == {s.name for s in SPEC.inputs}  # clients send ids
    held = repo.root / name / "1" / "bundle"
    assert sorted(os.listdir(held)) == ["embeddings.safetensors", "manifest.json"]
    store = (split_store_bundle / "embeddings.safetensors").read_bytes()
    assert (held / "embeddings.safetensors").read_bytes() == store
    # the stage graphs are small: the tables live in the store only
    graphs = sum((repo.root / f"{name}_{s}" / "1" / "model.onnx").stat().st_size for s in ("user", "group"))
    assert graphs < len(store)


def test_gpu_repository_scores_a_store_bundle_through_bls(tmp_path, triton_env, split_store_bundle, model):
    """The gpu topology (BLS + user/group stage models) on a real tritonserver, stage graphs
    in the Python backend: lookups in the orchestrator, scores == eager; an id outside its
    table is the request's error naming the input; a corrupt store copy is refused."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    repo = write_repository(split_store_bundle, tmp_path / "repo", "gpu", stage_backend="python")
    rows, rankings = _rankings(3, 7, seed=4)
    with TritonServer(repo.root, triton_env) as server:
        client = th.InferenceServerClient(server.http_url)
        got = triton_scores(client, repo.model_name, rankings, True)
        one = triton_scores(client, repo.model_name, rankings[1:2], False)
        user, cands = rankings[0]
        bad = {**cands, "item_ids": np.full_like(cands["item_ids"], V)}  # one past the table
        with pytest.raises(InferenceServerException, match=r"item_ids.*300"):
            triton_scores(client, repo.model_name, [(user, bad)], True)
        client.close()
    want = _eager(model, rows, (3, 7))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(one[0], want[1], rtol=0, atol=1e-6)


def test_bls_store_copy_is_checked(tmp_path, split_store_bundle, model):
    from runtime.embstore import StoreFeeds
    from runtime.errors import BundleError
    from runtime.manifest import Manifest

    repo = write_repository(split_store_bundle, tmp_path / "repo", "gpu", stage_backend="python")
    held = repo.root / repo.model_name / "1" / "bundle"
    manifest = Manifest.read(held)
    feeds = StoreFeeds.for_directory(held, manifest)  # what the orchestrator's initialize runs
    cands = _rankings(1, 3, seed=6)[1][0][1]
    key = next(lk.stage_input for lk in feeds.lookups if lk.input == "item_ids")
    np.testing.assert_array_equal(feeds.feeds(cands, "group")[key], model.item_w.detach().numpy()[cands["item_ids"]])
    raw = bytearray((held / "embeddings.safetensors").read_bytes())
    raw[-1] ^= 1
    (held / "embeddings.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="does not match its manifest sha256"):
        StoreFeeds.for_directory(held, manifest)
    (held / "embeddings.safetensors").unlink()
    with pytest.raises(BundleError, match="is missing"):
        StoreFeeds.for_directory(held, manifest)


@pytest.mark.gpu
def test_gpu_repository_of_a_store_bundle_on_a_gpu(tmp_path, split_store_bundle, model):
    import tritonclient.http as th

    from tests.triton.test_triton_gpu import gpu_server

    repo = write_repository(split_store_bundle, tmp_path / "repo", "gpu")
    rows, rankings = _rankings(2, 5, seed=9)
    with gpu_server(repo.root) as server:
        client = th.InferenceServerClient(server.http_url)
        got = triton_scores(client, repo.model_name, rankings, True)
    np.testing.assert_allclose(got, _eager(model, rows, (2, 5)), rtol=0, atol=1e-4)
