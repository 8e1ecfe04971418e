"""Repository layout and config.pbtxt files, checked against Triton's ModelConfig schema.

No server here: these parse what ``write_repository`` wrote with protobuf's text
format into ``tritonclient.grpc.model_config_pb2.ModelConfig`` (independently of the
writer's own validation) and check the fields a fleet depends on.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from runtime.errors import BundleError, ParityError, RequestError
from runtime.manifest import Manifest
from runtime.triton import write_repository
from runtime.triton.batch import chunk_by_candidates, rows_from_request
from runtime.triton.config import TritonConfigError, render, write_config
from tests.triton.conftest import MAX_CANDIDATES, ranking


def load_config(model_dir) -> pb.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig())


def io(cfg) -> dict:
    return {
        t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in (*cfg.input, *cfg.output)
    }


def test_cpu_config_batches_rankings_from_the_bundle_limits(tmp_path, tri_bundle):
    repo = write_repository(tri_bundle, tmp_path, "cpu", max_queue_delay_us=777)
    assert repo.models == ["toysplit"]
    cfg = load_config(tmp_path / "toysplit")
    limits = Manifest.read(tri_bundle).limits
    assert cfg.backend == "python" and cfg.max_batch_size == limits.max_users_per_call
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 777
    assert io(cfg) == {
        "user_ids": ("TYPE_INT64", [3]),
        "user_dense": ("TYPE_FP32", [4]),
        "item_ids": ("TYPE_INT64", [-1, 2]),
        "item_dense": ("TYPE_FP32", [-1, 2]),
        "ctr": ("TYPE_FP32", [-1]),
    }
    ragged = {t.name for t in cfg.input if t.allow_ragged_batch}
    assert ragged == {"item_ids", "item_dense"}
    vdir = tmp_path / "toysplit" / "1"
    assert (vdir / "model.py").is_file() and (vdir / "ugsep" / "runtime" / "scorer.py").is_file()
    # the bundle is copied whole and still verifies (sha256 of every file)
    import runtime

    assert runtime.load(vdir / "bundle", "onnxruntime").split


def test_gpu_configs_validate_and_wire_the_split(tmp_path, tri_bundle):
    repo = write_repository(tri_bundle, tmp_path, "gpu")
    assert repo.models == ["toysplit", "toysplit_user", "toysplit_group"]
    user, group, entry = (
        load_config(tmp_path / m) for m in ("toysplit_user", "toysplit_group", "toysplit")
    )
    for cfg in (user, group):
        assert cfg.backend == "onnxruntime" and cfg.max_batch_size == 0
        assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    assert io(user) == {
        "user_ids": ("TYPE_INT64", [-1, 3]),
        "user_dense": ("TYPE_FP32", [-1, 4]),
        "user_vec": ("TYPE_FP32", [-1, 16]),
    }
    assert io(group) == {
        "item_ids": ("TYPE_INT64", [-1, 2]),
        "item_dense": ("TYPE_FP32", [-1, 2]),
        "user_vec": ("TYPE_FP32", [-1, 16]),
        "user_index": ("TYPE_INT64", [-1]),
        "ctr": ("TYPE_FP32", [-1]),
    }
    assert entry.backend == "python" and entry.HasField("dynamic_batching")
    stages = json.loads(entry.parameters["stages"].string_value)
    assert (
        stages["user"]["model"] == "toysplit_user" and stages["group"]["inputs"][-1] == "user_index"
    )
    for m in ("toysplit_user", "toysplit_group"):
        assert (tmp_path / m / "1" / "model.onnx").is_file()


def test_python_stage_models_keep_a_stage_thread_cap_from_the_manifest(tmp_path, tri_bundle):
    """A stage timed faster on fewer threads at export (manifest intra_op_threads) keeps that
    cap in its CPU stage model; the other stage gets the repository's thread count."""
    bundle = tmp_path / "capped"
    shutil.copytree(tri_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["stages"]["user"]["intra_op_threads"] = 1
    (bundle / "manifest.json").write_text(json.dumps(m))
    for asked, user_threads, group_threads in ((2, "1", "2"), (0, "1", "0")):
        root = tmp_path / f"repo{asked}"
        repo = write_repository(
            bundle, root, "gpu", stage_backend="python", intra_op_threads=asked
        )
        user, group = (load_config(root / name) for name in repo.models[1:])
        assert user.parameters["intra_op_threads"].string_value == user_threads
        assert group.parameters["intra_op_threads"].string_value == group_threads


def test_tensorrt_engines_become_plan_models_per_compute_capability(tmp_path, tri_bundle):
    from exporter.steps.write import update_bundle

    b = shutil.copytree(tri_bundle, tmp_path / "bundle")
    engines = []
    for cc in ("8.6", "9.0"):
        d = f"engines/sm{cc.replace('.', '')}-trt10.3"
        engines.append(
            {"dir": d, "gpu": "test", "compute_capability": cc, "trt_version": "10.3", "files": {}}
        )
    files = {
        f"{e['dir']}/{s}.plan": b"not a real engine" for e in engines for s in ("user", "group")
    }
    update_bundle(b, files, engines=engines)
    write_repository(b, tmp_path / "repo", "gpu")
    cfg = load_config(tmp_path / "repo" / "toysplit_group")
    assert cfg.platform == "tensorrt_plan"
    assert dict(cfg.cc_model_filenames) == {"8.6": "group_sm86.plan", "9.0": "group_sm90.plan"}
    assert (tmp_path / "repo" / "toysplit_group" / "1" / "group_sm90.plan").is_file()
    # a second TensorRT version for one GPU: ambiguous unless the image's version is given
    extra = {**engines[0], "dir": "engines/sm86-trt10.8", "trt_version": "10.8"}
    update_bundle(
        b, {f"{extra['dir']}/{s}.plan": b"x" for s in ("user", "group")}, engines=[*engines, extra]
    )
    with pytest.raises(
        BundleError, match="several engines for compute capability 8.6.*--trt-version"
    ):
        write_repository(b, tmp_path / "repo2", "gpu")
    write_repository(b, tmp_path / "repo2", "gpu", trt_version="10.8")
    cfg = load_config(tmp_path / "repo2" / "toysplit_user")
    assert dict(cfg.cc_model_filenames) == {"8.6": "user_sm86.plan"}
    with pytest.raises(BundleError, match=r"no TensorRT engines for TensorRT 9\.0.*10\.3, 10\.8"):
        write_repository(b, tmp_path / "repo3", "gpu", trt_version="9.0")


def test_a_config_outside_the_schema_is_refused_before_writing(tmp_path):
    bad = {"name": "m", "backend": "python", "max_batch_size": 0, "dynamic_batchin": {}}
    with pytest.raises(TritonConfigError, match="ModelConfig schema.*dynamic_batchin"):
        write_config(tmp_path / "m", bad)
    assert not (tmp_path / "m" / "config.pbtxt").exists()
    no_batch = {"name": "m", "backend": "python", "max_batch_size": 0, "dynamic_batching": {}}
    with pytest.raises(TritonConfigError, match="dynamic_batching needs max_batch_size > 0"):
        write_config(tmp_path / "m", no_batch)
    assert "dims: [ -1, 3 ]" in render({"input": [{"dims": [-1, 3]}]})


def test_unverified_bundles_and_name_clashes_are_refused(tmp_path, tri_bundle):
    from exporter.steps.write import update_bundle

    b = shutil.copytree(tri_bundle, tmp_path / "bundle")
    update_bundle(b, {}, parity={"passed": False, "failed_stages": ["onnx-split"], "summary": {}})
    with pytest.raises(ParityError, match="onnx-split"):
        write_repository(b, tmp_path / "repo")
    write_repository(b, tmp_path / "repo", allow_unverified=True)
    cfg = load_config(tmp_path / "repo" / "toysplit")
    assert cfg.parameters["allow_unverified"].string_value == "true"
    with pytest.raises(BundleError, match="already has model"):
        write_repository(b, tmp_path / "repo", allow_unverified=True)
    write_repository(
        b, tmp_path / "repo", allow_unverified=True, overwrite=True, model_name="v2 model"
    )
    assert (tmp_path / "repo" / "v2_model" / "config.pbtxt").is_file()


def test_cli_writes_the_repository_and_reports_errors(tmp_path, tri_bundle, capsys):
    from exporter.cli import main

    assert main(["triton", str(tri_bundle), "--out", str(tmp_path / "r"), "--kind", "gpu"]) == 0
    assert "toysplit_group" in capsys.readouterr().out
    assert load_config(tmp_path / "r" / "toysplit_user").backend == "onnxruntime"
    assert main(["triton", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]) == 2


def _getter(arrays):
    return arrays.get


def test_rows_from_request_splits_rankings_and_names_bad_shapes(tri_scorer):
    spec = tri_scorer.spec
    (u1, c1), (u2, c2) = ranking(1, 4), ranking(2, 4)
    arrays = {
        **{k: np.concatenate([u1[k], u2[k]]) for k in u1},
        **{k: np.stack([c1[k], c2[k]]) for k in c1},
    }
    rows = rows_from_request(spec, _getter(arrays), MAX_CANDIDATES)
    assert [r.n for r in rows] == [4, 4]
    np.testing.assert_array_equal(rows[1].user["user_ids"], u2["user_ids"])
    np.testing.assert_array_equal(rows[1].candidates["item_dense"], c2["item_dense"])
    with pytest.raises(RequestError, match="same leading"):
        rows_from_request(spec, _getter({**arrays, "user_dense": u1["user_dense"]}), MAX_CANDIDATES)
    with pytest.raises(RequestError, match=r"candidate input 'item_ids'.*\[batch, candidates"):
        flat = {**arrays, "item_ids": c1["item_ids"][:, 0][None, :].repeat(2, 0)[:, 0]}
        rows_from_request(spec, _getter(flat), MAX_CANDIDATES)
    with pytest.raises(RequestError, match="'user_key' names one user"):
        rows_from_request(spec, _getter(arrays), MAX_CANDIDATES, user_key="k:alice")
    with pytest.raises(RequestError, match="'user_dense' is missing"):
        rows_from_request(
            spec, _getter({k: v for k, v in arrays.items() if k != "user_dense"}), MAX_CANDIDATES
        )


def test_chunk_by_candidates_bounds_each_group_call(tri_scorer):
    rows = [tri_scorer.prepare(*ranking(s, n)) for s, n in enumerate([5, 5, 7, 20, 1, 2])]
    chunks = chunk_by_candidates(rows, 12)
    assert [[r.n for r in c] for c in chunks] == [[5, 5], [7], [20], [1, 2]]
    assert [r for c in chunks for r in c] == rows


def test_a_packed_bundle_tar_is_accepted(tmp_path, tri_bundle):
    import runtime

    tar = runtime.pack(tri_bundle, tmp_path / "toysplit.tar")
    write_repository(tar, tmp_path / "repo", "cpu")
    assert runtime.load(tmp_path / "repo" / "toysplit" / "1" / "bundle", "onnxruntime").split
