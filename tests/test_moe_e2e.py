"""The MoE (TokenMixer-Large-style) student through the whole CLI: train -> export fp32 (split,
MoE form timed per stage, parity) -> export w8a16 (expert tables int8 per expert and output
channel, routers float) -> ugsep check -> inspect. Parity is against the eager model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporter.cli import main
from students.data import load_npz, save_npz
from students.train import distill

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained tiny MoE student and 600 held-out rows (labels, requests)."""
    out = tmp_path_factory.mktemp("tokenmixer")
    distill("tokenmixer", "tiny", out, progress=False, n_train=4000, teacher_data_factor=1,
            max_steps=6, control=False, n_requests=30, candidates=20)
    rows = load_npz(out / "heldout.npz")
    save_npz(out / "rows.npz", {k: v[:600] for k, v in rows.items()})
    return out


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_fp32_export_splits_hoists_the_user_moe_and_passes_parity(trained, tmp_path, capsys):
    bundle = tmp_path / "b32"
    rc = main(["export", str(trained / "student"), "--out", str(bundle),
               "--data", str(trained / "rows.npz")])
    assert rc == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = json.loads((bundle / "split_report.json").read_text())
    hoisted = report["report"]["hoisted_modules"] if "report" in report else report["hoisted_modules"]
    for layer in (0, 1):
        assert f"layers.{layer}.user_moe.experts" in hoisted
        assert f"layers.{layer}.cand_moe.experts" not in hoisted
    assert any(b["source"].startswith("layers.1") for b in manifest["split"]["boundary"])
    forms = manifest["optimize"]["moe_form"]
    assert set(forms) == {"full", "user", "group"}
    assert {b["name"] for b in forms["user"]["banks"]} == {
        "layers.0.user_moe.experts", "layers.1.user_moe.experts"}
    bank = forms["group"]["banks"][0]
    assert (bank["tokens"], bank["experts"], bank["top_k"]) == (4, 4, 2)
    assert bank["params"]["total"] == 4 * 4 * (2 * 32 * 64 + 64 + 32)
    user_w = _initializers(bundle / "user.onnx")
    group_w = _initializers(bundle / "group.onnx")
    assert any("user_moe" in n for n in user_w) and not any("user_moe" in n for n in group_w)
    assert manifest["parity"]["passed"]
    capsys.readouterr()
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().err  # the rich console writes to stderr
    assert "MoE" in out and "activated" in out


def test_w8a16_quantizes_expert_tables_per_expert_and_passes_check(trained, tmp_path):
    bundle = tmp_path / "b8"
    # fixed form and layer set (no timing decides what is quantized), the default budgets
    rc = main(["export", str(trained / "student"), "--out", str(bundle), "--precision", "w8a16",
               "--data", str(trained / "rows.npz"), "--moe-form", "gather", "--no-quant-tune",
               "--quant-min-elements", "0", "--quant-per-token-stages", "full", "user", "group",
               "--quant-small-batch", "off"])
    assert rc == 0
    user_w = _initializers(bundle / "user.onnx")
    q = user_w["layers.0.user_moe.experts.w1_table_q"]
    scale = user_w["layers.0.user_moe.experts.w1_table_scale"]
    assert q.dtype == np.int8 and q.shape == (4 * 4, 32, 64) and scale.shape == (16, 1, 64)
    assert np.abs(q).max(axis=1).min() == 127  # every (expert, output channel) uses its range
    assert "layers.0.user_moe.router" in user_w or any("router" in n for n in user_w)
    assert not any("router" in n and w.dtype == np.int8 for n, w in user_w.items())
    manifest = json.loads((bundle / "manifest.json").read_text())
    layers = {r["name"]: r for r in manifest["quantization"]["layers"]}
    tables = [r for n, r in layers.items() if n.endswith("user_moe.experts.w1_table")]
    assert tables and all(r["precision"] == "int8" for r in tables)  # as the graph has them
    wb = manifest["quantization"]["weight_bytes"]["user"]  # the int8 tables are in the count
    int8_tables = [w for n, w in user_w.items() if n.endswith("_table_q")]
    assert len(int8_tables) >= 2  # some tables may stay float by the accuracy budget
    assert wb["quantized_layers_fp32"] >= sum(w.size * 4 for w in int8_tables)
    assert manifest["parity"]["passed"]
    assert main(["check", str(bundle), "--data", str(trained / "rows.npz")]) == 0


def _fused_export(trained, bundle, *extra) -> tuple[dict, dict[str, str]]:
    rc = main(["export", str(trained / "student"), "--out", str(bundle), "--precision", "w8a16",
               "--data", str(trained / "rows.npz"), "--moe-form", "fused", "--no-quant-tune",
               "--quant-min-elements", "0", "--quant-small-batch", "off", *extra])
    assert rc == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    user = onnx.load(bundle / "user.onnx")
    ops = {}  # bank -> the op that runs it in user.onnx
    for n in user.graph.node:
        if n.op_type in ("MoE", "QMoE"):
            w1 = n.input[2]  # fc1_experts_weights: <bank>.fused_w1[_q]
            ops[w1.split(".fused_w1")[0]] = n.op_type
    return manifest, ops


def test_w8a16_fused_form_is_qmoe_and_passes_its_budget(trained, tmp_path):
    """--moe-form fused: every stage's banks are one com.microsoft.MoE, W8A16 lowers them to
    QMoE (int8 weights per expert, channel and block); under a budget that admits every bank,
    both user banks are QMoE, the manifest lists each bank as one int8 layer group run by QMoE,
    and parity and ``ugsep check`` pass at that budget."""
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps({"w8a16": {"abs_delta_auc": 0.05, "top10_overlap_mean": 0.8}}))
    bundle = tmp_path / "b8f"
    manifest, ops = _fused_export(trained, bundle, "--budgets", str(budgets))
    assert {f["form"] for f in manifest["optimize"]["moe_form"].values()} == {"fused"}
    assert ops == {"layers.0.user_moe.experts": "QMoE", "layers.1.user_moe.experts": "QMoE"}
    q = {t.name: numpy_helper.to_array(t) for t in onnx.load(bundle / "user.onnx").graph.initializer}[
        "layers.0.user_moe.experts.fused_w1_q"]
    assert q.dtype == np.uint8 and q.shape == (4 * 4, 64, 32)  # [T*E, H, D]: (out, in) per expert
    rows = [r for r in manifest["quantization"]["layers"] if r["name"].endswith("_moe.experts")]
    assert len(rows) == 8  # user, group: 2 banks each; full: 4
    assert all(r["precision"] == "int8" and r["weights"] == 2 for r in rows)
    assert {r["kernel"] for r in rows} == {"QMoE(bits=8, block_size=32)"}  # D=32: largest 2^k | D, H
    assert manifest["parity"]["passed"]
    assert main(["check", str(bundle), "--data", str(trained / "rows.npz"),
                 "--budgets", str(budgets)]) == 0


def test_w8a16_fused_form_at_the_default_budgets_keeps_graph_and_manifest_agreed(trained, tmp_path):
    """At the default (tight) ranking budget the selection may keep a bank float: whichever it
    keeps, a float bank stays com.microsoft.MoE and an int8 one is QMoE in user.onnx, exactly
    as the manifest's rows say, and parity passes."""
    manifest, ops = _fused_export(trained, tmp_path / "b8d")
    rows = {r["name"].split(":", 1)[1]: r for r in manifest["quantization"]["layers"]
            if r["stage"] == "user" and r["name"].endswith("_moe.experts")}
    assert set(rows) == set(ops) == {"layers.0.user_moe.experts", "layers.1.user_moe.experts"}
    for bank, op in ops.items():
        assert (op == "QMoE") == (rows[bank]["precision"] == "int8"), (bank, op, rows[bank])
        assert rows[bank]["kernel"].startswith("QMoE(" if op == "QMoE" else "fp32")
    assert "QMoE" in ops.values()  # the budget admits at least one bank on this student
    assert manifest["parity"]["passed"]


def test_w8a16_default_path_times_the_forms_and_passes_the_default_budgets(
    trained, tmp_path, caplog
):
    """No --moe-form, no --no-quant-tune: the forms and the layers kept float are chosen by
    measurement (not asserted: they depend on the machine); what the manifest says matches
    the written graphs, and parity passes at the default budgets."""
    bundle = tmp_path / "b8d"
    with caplog.at_level("WARNING", logger="exporter.steps.graph_record"):
        rc = main(["export", str(trained / "student"), "--out", str(bundle),
                   "--precision", "w8a16", "--data", str(trained / "rows.npz")])
    assert rc == 0
    assert not [r.message for r in caplog.records if "follows the written graph" in r.message]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {f["chosen_by"] for f in manifest["optimize"]["moe_form"].values()} == {"timed"}
    assert manifest["parity"]["passed"]
    assert main(["check", str(bundle), "--data", str(trained / "rows.npz")]) == 0
