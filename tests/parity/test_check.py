"""check_bundle end to end on real bundles: stages, rows, records, determinism, runtime guard."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import runtime
from exporter.errors import ExportError
from exporter.steps.capture import to_torch_inputs
from exporter.steps.parity import check_bundle
from runtime.bundle import Bundle, sha256_file
from runtime.errors import ParityError
from runtime.manifest import Manifest
from runtime.sample import sample_requests
from runtime.spec import FeatureSpec
from tests.parity.conftest import SPLIT_SPEC
from tests.parity.faults import scale_weight
from tests.parity.test_metrics import brute_auc


def test_split_bundle_passes_on_every_stage_and_records_it(split_bundle, split_model):
    report = check_bundle(split_bundle, split_model, n_rows=300, progress=False)
    assert report.passed and report.failed_stages == []
    statuses = {s.name: s.status for s in report.stages}
    assert statuses == {
        "split-eager": "passed",  # the split pass's FX graphs, in PyTorch
        "onnx-full": "passed",
        "onnx-split": "passed",
        "tensorrt": "skipped",
    }
    for name in ("split-eager", "onnx-full", "onnx-split"):
        assert report.stage(name).outputs["ctr"]["max_abs"] <= 1e-5
    m = Manifest.read(split_bundle)
    assert m.parity.passed is True and m.parity.failed_stages == []
    assert m.parity.report == "parity.json"
    assert m.files["parity.json"].sha256 == sha256_file(split_bundle / "parity.json")
    Bundle.open(split_bundle)  # still verifies, parity.json included
    on_disk = json.loads((split_bundle / "parity.json").read_text())
    assert on_disk == json.loads(json.dumps(report.to_dict()))
    runtime.load(split_bundle)  # the guard accepts a passed record


def test_same_seed_same_report_other_seed_other_rows(split_bundle_master, split_model, tmp_path):
    dicts = []
    for i, seed in enumerate((3, 3, 4)):
        b = shutil.copytree(split_bundle_master, tmp_path / f"b{i}")
        dicts.append(check_bundle(b, split_model, n_rows=200, seed=seed, progress=False).to_dict())
        dicts[-1]["parity.json"] = (b / "parity.json").read_bytes()
    assert dicts[0] == dicts[1]
    assert dicts[0] != dicts[2]


def test_held_out_rows_with_labels_give_auc_and_logloss(split_bundle, split_model):
    spec = FeatureSpec.from_dict(SPLIT_SPEC)
    rows, rid = sample_requests(spec, 6, 40, seed=11)
    with torch.no_grad():
        p = split_model(**to_torch_inputs(spec, rows)).numpy()
    labels = (np.random.default_rng(0).random(len(p)) < p).astype(np.float32)
    data = {**rows, "label": labels, "request_id": rid}
    report = check_bundle(split_bundle, split_model, rows=data, progress=False)
    m = report.stage("onnx-split").outputs["ctr"]
    assert report.rows == {"n": 240, "requests": 6, "source": "data", "labels": True}
    assert m["auc_ref"] == pytest.approx(brute_auc(labels, p), abs=1e-9)
    assert abs(m["delta_auc"]) < 1e-4 and abs(m["delta_logloss"]) < 1e-5
    assert m["top10_overlap"]["n"] == 6 and m["kendall_tau"]["mean"] > 0.999


def test_rows_missing_an_input_are_refused(split_bundle, split_model):
    rows, _ = sample_requests(FeatureSpec.from_dict(SPLIT_SPEC), 2, 5)
    del rows["item_dense"]
    with pytest.raises(ExportError, match=r"lack input\(s\) \['item_dense'\]"):
        check_bundle(split_bundle, split_model, rows=rows, progress=False)


def test_unknown_stage_is_refused(split_bundle, split_model):
    with pytest.raises(ExportError, match="no parity stage"):
        check_bundle(split_bundle, split_model, stages=["onnx-fulll"], progress=False)


def test_runtime_refuses_unchecked_and_failed_bundles(split_bundle, split_model):
    with pytest.raises(ParityError, match="has no parity record"):
        runtime.load(split_bundle)
    assert runtime.load(split_bundle, allow_unverified=True) is not None
    scale_weight(split_bundle, "group.onnx", "group.cross", 1.5)
    report = check_bundle(split_bundle, split_model, n_rows=200, progress=False, localise=False)
    assert not report.passed and report.failed_stages == ["onnx-split"]
    assert Manifest.read(split_bundle).parity.failed_stages == ["onnx-split"]
    with pytest.raises(ParityError, match=r"failed its parity check \(onnx-split\)"):
        runtime.load(split_bundle)
    assert runtime.load(split_bundle, allow_unverified=True) is not None


def test_budget_override_changes_the_verdict(split_bundle, split_model):
    scale_weight(split_bundle, "group.onnx", "group.cross", 1.5)
    loose = {"stages": {"onnx-split": {"max_abs": 0.5}}, "top10_overlap_mean": 0.5}
    report = check_bundle(split_bundle, split_model, n_rows=200, budgets=loose, progress=False)
    assert report.passed, report.summary()


def test_table_renders_every_stage(split_bundle, split_model):
    from rich.console import Console

    report = check_bundle(split_bundle, split_model, n_rows=200, progress=False, write=False)
    console = Console(width=200, record=True)
    console.print(report.table())
    text = console.export_text()
    for name in ("onnx-full", "onnx-split", "tensorrt", "max abs", "top-10"):
        assert name in text
    assert not (split_bundle / "parity.json").exists()  # write=False leaves the bundle alone


def test_archive_bundle_checks_without_writing(split_bundle, split_model, tmp_path):
    from runtime.bundle import pack

    tar = pack(split_bundle, tmp_path / "b.tar")
    with pytest.raises(ExportError, match="not a bundle directory"):
        check_bundle(tar, split_model, n_rows=100, progress=False)
    report = check_bundle(tar, split_model, n_rows=100, progress=False, write=False)
    assert report.passed


def test_progress_output_does_not_change_the_report(split_bundle_master, split_model, tmp_path):
    a = shutil.copytree(split_bundle_master, tmp_path / "a")
    b = shutil.copytree(split_bundle_master, tmp_path / "b")
    quiet = check_bundle(a, split_model, n_rows=150, progress=False).to_dict()
    loud = check_bundle(b, split_model, n_rows=150, progress=True).to_dict()
    assert quiet == loud
