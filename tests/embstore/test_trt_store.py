"""TensorRT with a store bundle: the store stays outside the engines, whose profiles cover
the looked-up rows. On the CPU: `--target trt` export (lint on the cut graphs, engines left
for the GPU), `check --trt-lint`, the `build-trt --plan` profiles, the one-line refusal to
build without TensorRT. On a GPU (skipped elsewhere): engines built and scored == eager."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import runtime
from exporter.cli import main
from exporter.steps.capture import to_torch_inputs
from runtime.backends.tensorrt import TrtBackend
from runtime.sample import sample_requests
from runtime.spec import FeatureSpec
from students.data import save_npz
from tests.embstore.models import make_toy_lookups, toy_spec, write_checkpoint

pytestmark = pytest.mark.slow
SPEC = FeatureSpec.from_dict(toy_spec())
IDS = {s.name for s in SPEC.inputs if s.dtype == "int64"} - {"user_city"}  # user_city: in the graph
# the toy's looked-up rows per stage input: [*ids shape, dim 8] (bags keep the sequence: [6, 8])
ROWS = {"user_ids": (3, 8), "user_seq": (6, 8), "item_ids": (2, 8), "item_cat": (1, 8), "item_tags": (4, 8)}


@pytest.fixture(scope="module")
def model():
    return make_toy_lookups()


@pytest.fixture(scope="module")
def trt_store_bundle(tmp_path_factory, model):
    tmp = tmp_path_factory.mktemp("trt_store")
    ckpt = write_checkpoint(tmp / "ckpt", model, toy_spec())
    rows, rid = sample_requests(SPEC, 4, 50, seed=3)
    data = save_npz(tmp / "held.npz", {**rows, "request_id": rid})
    out = tmp / "b"
    code = main(["export", str(ckpt), "--out", str(out), "--data", str(data), "--store-min-bytes", "4096",
                 "--trust-module", "tests", "--target", "trt"])
    assert code == 0
    return out


def _plan(bundle, capsys, *flags) -> dict:
    capsys.readouterr()
    assert main(["build-trt", str(bundle), "--plan", *flags]) == 0
    return json.loads(capsys.readouterr().err)


def test_target_trt_exports_a_store_bundle_and_lints_it(trt_store_bundle, capsys):
    m = json.loads((trt_store_bundle / "manifest.json").read_text())
    assert m["embeddings"]["lookups"] and m["engines"] == []  # no GPU here: engines come later
    assert json.loads((trt_store_bundle / "parity.json").read_text())["passed"]
    assert main(["check", "--trt-lint", str(trt_store_bundle)]) == 0
    err = capsys.readouterr().err
    for stage in ("full", "user", "group"):
        assert f"{stage}.onnx: ready for TensorRT" in err


def test_engine_profiles_cover_the_lookup_inputs(trt_store_bundle, capsys):
    m = json.loads((trt_store_bundle / "manifest.json").read_text())
    by_input = {lk["input"]: lk for lk in m["embeddings"]["lookups"]}
    assert set(by_input) == set(ROWS)
    plan = _plan(trt_store_bundle, capsys, "--m", "1,4,16", "--n", "1,64,512", "--stages", "user", "group", "full")
    assert plan["store"] == "embeddings.safetensors" and plan["M"] == [1, 4, 16] and plan["N"] == [1, 64, 512]
    ranges = {"M": ([1], [4], [16]), "N": ([1], [64], [512])}
    for stage, batch_of in (("user", {"user": "M"}), ("group", {"group": "N"}),
                            ("full", {"user": "N", "group": "N"})):  # full: user rows repeated per candidate
        inputs = plan["stages"][stage]
        if stage != "full":  # full.onnx keeps the spec's inputs (the ids unused): every graph does
            assert not IDS & set(inputs), stage  # ids never reach these engines: the runtime looks them up
        for name, lk in by_input.items():
            if lk["side"] not in batch_of:
                assert lk["stage_input"] not in inputs
                continue
            got = inputs[lk["stage_input"]]
            lo, opt, hi = ranges[batch_of[lk["side"]]]
            want = list(ROWS[name])
            assert (got["batch"], got["min"], got["opt"], got["max"]) == (
                batch_of[lk["side"]], lo + want, opt + want, hi + want), (stage, name)
            assert got["store_table"] == lk["table"]
    boundary = {b["name"] for b in m["split"]["boundary"]}
    assert all(plan["stages"]["group"][b]["batch"] == "M" for b in boundary)
    assert plan["stages"]["group"]["item_dense"]["max"] == [512, 2]


def test_build_trt_without_tensorrt_is_one_line_exit_2(trt_store_bundle, capsys):
    if TrtBackend.availability(None) is None:
        pytest.skip("this machine can build engines (see the gpu test below)")
    capsys.readouterr()
    assert main(["build-trt", str(trt_store_bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot build TensorRT engines here" in err and len(err.splitlines()) == 1
    assert main(["build-trt", str(trt_store_bundle), "--plan", "--stages", "user", "--n", "9,4,1"]) == 2
    assert "min <= opt <= max" in capsys.readouterr().err


@pytest.mark.gpu
def test_engines_of_a_store_bundle_score_like_eager(trt_store_bundle, model, tmp_path):
    reason = TrtBackend.availability(None)
    if reason is not None:
        pytest.skip(f"no NVIDIA GPU / tensorrt not installed: {reason}")
    import shutil

    from exporter.steps.tensorrt import build_engines

    bundle = shutil.copytree(trt_store_bundle, tmp_path / "b")
    entry = build_engines(bundle, m="1,2,8", n="1,64,512", cache_dir=tmp_path)
    assert set(entry.store_inputs) == {"user", "group"}
    scorer = runtime.load(bundle, backend="tensorrt", allow_unverified=True)
    rows, rid = sample_requests(SPEC, 3, 40, seed=12)
    got = np.concatenate([
        scorer.score({s.name: rows[s.name][rid == r][:1] for s in SPEC.user_inputs},
                     {s.name: rows[s.name][rid == r] for s in SPEC.group_inputs})["ctr"] for r in range(3)])
    with torch.no_grad():
        want = model(**to_torch_inputs(SPEC, rows)).numpy()
    assert np.abs(got - want).max() <= 2e-3  # fp16 kernels
