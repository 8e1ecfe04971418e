"""Budgets: defaults per precision, overrides from dicts and files, clear errors."""

from __future__ import annotations

import json

import pytest

from exporter.errors import ExportError
from exporter.evaluate.budgets import evaluate, load_budgets


def test_defaults_fp32_tight_and_quantized_by_ranking():
    b = load_budgets(None)
    assert b.for_stage("onnx-full", "fp32")["max_abs"] == 1e-5
    q = b.for_stage("onnx-split-w8a16", "w8a16")
    assert q["abs_delta_auc"] == 1e-4 and q["top10_overlap_mean"] == 0.95 and q["max_abs"] > 1e-3


def test_overrides_flat_per_precision_and_per_stage(tmp_path):
    import yaml

    path = tmp_path / "b.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "max_abs": 2e-5,
                "w8a16": {"top10_overlap_mean": 0.9},
                "stages": {"onnx-split": {"max_abs": 1e-3}},
            }
        )
    )
    b = load_budgets(path)
    assert b.for_stage("onnx-full", "fp32")["max_abs"] == 2e-5
    assert b.for_stage("onnx-split", "fp32")["max_abs"] == 1e-3
    assert b.for_stage("x", "w8a16")["top10_overlap_mean"] == 0.9
    assert b.for_stage("x", "w8a16")["max_abs"] == 2e-5
    js = tmp_path / "b.json"
    js.write_text(json.dumps({"kendall_tau_mean": 0.99}))
    assert load_budgets(js).for_stage("x", "fp32")["kendall_tau_mean"] == 0.99


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"max_abz": 1}, "unknown key 'max_abz'"),
        ({"fp32": {"cosin": 1}}, "unknown metric 'cosin'"),
        ({"max_abs": "tight"}, "must be a number"),
        ({"stages": ["onnx-full"]}, "must map stage names"),
    ],
)
def test_bad_budgets_name_the_problem(bad, message):
    with pytest.raises(ExportError, match=message):
        load_budgets(bad)


def test_missing_budget_file(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        load_budgets(tmp_path / "nope.yaml")


def test_evaluate_directions_and_not_evaluated():
    metrics = {"max_abs": 2e-5, "cosine": 0.99, "top10_overlap": {"mean": 0.97}, "auc": None}
    breaches, skipped = evaluate(
        metrics,
        {"max_abs": 1e-5, "cosine": 0.999, "top10_overlap_mean": 0.95, "abs_delta_auc": 1e-4},
    )
    assert len(breaches) == 2
    assert breaches[0].startswith("max_abs = 2e-05 (budget ≤ 1e-05)")
    assert breaches[1].startswith("cosine = 0.99 (budget ≥ 0.999)")
    assert skipped == ["abs_delta_auc"]
