"""The distillation trainer end to end on a small budget (real training, real files)."""

from __future__ import annotations

import json

import pytest
import torch

from runtime.spec import FeatureSpec
from students.checkpoint import load_checkpoint
from students.data import load_npz
from students.metrics import auc
from students.train import distill, predict_logits

REPORT_KEYS = {
    "kind",
    "size",
    "seed",
    "heldout_rows",
    "heldout_requests",
    "bayes_auc",
    "bayes_auc_expected",
    "teacher_auc",
    "student_auc",
    "student_labels_only_auc",
    "recovered_share",
    "teacher_logloss",
    "student_logloss",
    "student_labels_only_logloss",
    "train_seconds",
    "checkpoints",
    "heldout",
    "total_seconds",
    "total_cpu_seconds",
}
SMALL = dict(
    n_train=20_000,
    teacher_data_factor=2,
    epochs=1,
    teacher_epochs=1,
    n_requests=100,
    batch_size=256,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    report = distill(kind="rankmixer", size="tiny", out_dir=out, seed=0, progress=False, **SMALL)
    return out, report


@pytest.mark.slow
def test_report_has_every_number_and_they_make_sense(run):
    out, report = run
    assert set(report) == REPORT_KEYS
    assert json.loads((out / "report.json").read_text()) == report
    assert report["student_auc"] > 0.6, report
    for name in ("teacher_auc", "student_auc", "student_labels_only_auc"):
        assert 0.5 < report[name] < report["bayes_auc"], (name, report)
    gain = report["teacher_auc"] - report["student_labels_only_auc"]
    expected = (report["student_auc"] - report["student_labels_only_auc"]) / gain
    if gain > 0:
        assert report["recovered_share"] == pytest.approx(expected)
    else:
        assert report["recovered_share"] is None


@pytest.mark.slow
def test_checkpoints_reload_and_reproduce_the_reported_auc(run):
    out, report = run
    held = load_npz(out / "heldout.npz")
    assert held["request_id"].max() + 1 == report["heldout_requests"]
    for name in ("teacher", "student", "student_labels_only"):
        ckpt = out / name
        spec = FeatureSpec.from_dict(json.loads((ckpt / "spec.json").read_text()))
        assert {i.name for i in spec.inputs} <= set(held)
        model = load_checkpoint(ckpt)
        with torch.no_grad():
            score = predict_logits(model, held)
        assert auc(held["label"], score) == pytest.approx(report[f"{name}_auc"], abs=1e-9)
        assert json.loads((ckpt / "metrics.json").read_text())["auc"] == pytest.approx(
            report[f"{name}_auc"]
        )


@pytest.mark.slow
def test_two_tower_heldout_uses_dict_leaf_names_and_control_can_be_skipped(tmp_path):
    small = {**SMALL, "n_train": 5_000, "n_requests": 20, "control": False}
    report = distill(
        kind="twotower", size="tiny", out_dir=tmp_path, seed=1, progress=False, **small
    )
    held = load_npz(tmp_path / "heldout.npz")
    assert {
        "user.ids",
        "user.dense",
        "user.seq",
        "item.ids",
        "item.dense",
        "label",
        "request_id",
    } <= set(held)
    assert report["student_auc"] > 0.55
    assert report["student_labels_only_auc"] is None and report["recovered_share"] is None
    assert not (tmp_path / "student_labels_only").exists()
