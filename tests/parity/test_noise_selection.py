"""Noise-aware W8 selection on a real split bundle, and the interval in the parity report.

Labels are drawn from the eager model's own click probabilities (so AUC is meaningful);
the few hundred calibration rows here cannot resolve |ΔAUC| ≤ 1e-4, which is the case
the selection must say out loud and decide by the logit error instead.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import onnx
import pytest
import torch

from exporter.evaluate.auc_noise import Z, logit_tolerance
from exporter.steps.quantize import QuantizeOptions, calibration_for, quantize_bundle_stages
from runtime.manifest import Manifest
from runtime.sample import sample_requests
from tests.parity.conftest import boundary_names  # noqa: F401 - the fixtures' module


def labelled_rows(model, spec, n_req: int, seed: int) -> dict[str, np.ndarray]:
    from exporter.steps.capture import to_torch_inputs

    rows, rid = sample_requests(spec, n_req, 50, seed=seed)
    with torch.no_grad():
        p = model(**to_torch_inputs(spec, rows)).numpy().ravel()
    label = (np.random.default_rng(seed).random(p.size) < p).astype(np.float32)
    return {**rows, "label": label, "request_id": rid}


def _stages(bundle) -> tuple[dict[str, onnx.ModelProto], Manifest]:
    m = Manifest.read(bundle)
    return {k: onnx.load(str(bundle / v.file)) for k, v in m.stages.items()}, m


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"


def test_selection_says_when_rows_cannot_resolve_the_budget(split_bundle_master, split_model):
    stages, m = _stages(split_bundle_master)
    data = labelled_rows(split_model, m.spec, 6, seed=11)  # 300 rows
    calib = calibration_for(split_model, m.spec, data, n_rows=300)
    calib.heldout_rows = 1000
    every = QuantizeOptions(
        min_elements=0, per_token_stages=("full", "user", "group"), tune=False
    )
    lines, logger = _Lines(), logging.getLogger("exporter.steps.quantize.noise")
    logger.addHandler(lines)
    try:
        _, record = quantize_bundle_stages(stages, m.spec, options=every, calibration=calib)
    finally:
        logger.removeHandler(lines)
    outcome = record["outcome"]["user+group"]
    res = outcome["auc_resolution"]
    assert (res["calibration_rows"], res["heldout_rows"]) == (300, 1000)
    selected = outcome["selected"]["outputs"]["ctr"]
    budget = every.limits()["abs_delta_auc"]
    margin = selected["delta_auc_se"] * math.sqrt(1 + 300 / 1000)
    assert selected["delta_auc_margin_se"] == pytest.approx(margin)
    resolved = abs(selected["delta_auc"]) + Z * margin <= budget
    assert res["resolved"] is resolved
    if not resolved:  # the logit criterion decided, and the log says so
        assert selected["logit_rel_rms"] <= logit_tolerance(budget)
        assert "cannot resolve the ΔAUC budget" in lines.text
        assert res["criterion"].startswith("logit error")
    assert outcome["selected"]["passed"]
    assert any(r["precision"] != "fp32" for r in record["layers"] if r["stage"] != "full")


@pytest.mark.slow
def test_parity_report_shows_the_interval_beside_the_point(split_bundle, split_model, tmp_path):
    from exporter.steps.parity import check_bundle, write_html_report
    from tests.parity.faults import quantize_weight, rehash

    quantize_weight(split_bundle, "group.onnx", "group.cross")
    rehash(split_bundle, "group.onnx", precision="w8a16")
    spec = Manifest.read(split_bundle).spec
    data = labelled_rows(split_model, spec, 20, seed=3)
    report = check_bundle(split_bundle, split_model, rows=data, progress=False)
    stage = json.loads((split_bundle / "parity.json").read_text())["stages"]
    w8 = next(s for s in stage if s["name"] == "onnx-split-w8a16")["outputs"]["ctr"]
    ci = w8["delta_auc_ci"]
    assert ci["ci_low"] <= w8["delta_auc"] <= ci["ci_high"] and ci["se"] >= 0
    assert w8["auc_verdict"]["mode"] in ("resolved", "unresolved")
    head = report.stage("onnx-split-w8a16").headline("ctr")
    assert head["delta_auc_ci"] == [ci["ci_low"], ci["ci_high"]]
    html = write_html_report(report, tmp_path / "r.html").read_text()
    assert "ΔAUC 95% CI" in html and f"{ci['ci_low']:+.1e}" in html


def test_layers_are_ranked_by_what_their_measurement_resolves():
    """Before: a layer's point |ΔAUC| / budget ranked it, so noise (3e-4 ± 2e-4 on a few
    hundred rows) ranked a harmless layer as the most damaging one."""
    from exporter.steps.quantize import budget_damage

    limits = {"abs_delta_auc": 1e-4, "top10_overlap_mean": 0.95}

    def measured(d, se, rel):
        out = {"delta_auc": d, "abs_delta_auc": abs(d), "delta_auc_se": se,
               "logit_rel_rms": rel, "top10_overlap_mean": 1.0}
        return {"outputs": {"ctr": out}}

    noisy_harmless = budget_damage(measured(3e-4, 2e-4, 0.004), limits)[0]
    resolved_damage = budget_damage(measured(3e-4, 1e-5, 0.004), limits)[0]
    large_error = budget_damage(measured(1e-5, 2e-4, 0.06), limits)[0]
    assert noisy_harmless < 1.0 < resolved_damage
    assert large_error > 1.0  # the logit error is resolved even when ΔAUC is not
    assert noisy_harmless == pytest.approx(0.004 / logit_tolerance(1e-4))
