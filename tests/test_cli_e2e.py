"""The whole CLI path of a quantized student: train -> export --data w8a16 -> check -> inspect
-> runtime.load (its parity guard) -> scores like the eager model within the w8a16 budget.

The two-tower student: dict-leaf inputs (``user.ids``) exercise the data naming; its K = 64
layers cost 0.2656x their fp32 bytes as int8 + per-channel scales (its first layers, K = 42,
are padded to a 64-row MatMulNBits block and cost more: inspect must say so).
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import runtime
from exporter.cli import main
from exporter.evaluate.budgets import DEFAULTS
from runtime.manifest import Manifest
from students.base import model_inputs
from students.checkpoint import load_checkpoint
from students.data import load_npz
from students.train import distill

pytestmark = pytest.mark.slow

W8A16_MAX_ABS = DEFAULTS["w8a16"]["max_abs"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained two-tower student and its held-out requests (5000 rows, labels)."""
    out = tmp_path_factory.mktemp("twotower")
    distill(
        "twotower",
        "tiny",
        out,
        progress=False,
        n_train=20_000,
        teacher_data_factor=1,
        max_steps=30,
        control=False,
        n_requests=100,
    )
    return out


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tt-w8a16"
    data = str(trained / "heldout.npz")
    argv = ["export", str(trained / "student"), "--out", str(out), "--data", data]
    # every layer: the tiny towers sit below the ORT CPU speed threshold (see the test below)
    every = ["--quant-min-elements", "0", "--quant-per-token-stages", "full", "user", "group"]
    assert main([*argv, "--precision", "w8a16", *every]) == 0
    return out


def test_check_passes_on_every_data_row(trained, bundle, capsys):
    capsys.readouterr()
    assert main(["check", str(bundle), "--data", str(trained / "heldout.npz")]) == 0
    err = capsys.readouterr().err
    assert "parity passed" in err
    n = len(load_npz(trained / "heldout.npz")["label"])
    parity = Manifest.read(bundle).parity
    assert parity.passed, parity
    assert f"{n} rows" in err  # all rows of --data, not a 1000-row default


def _nbits_layers(path) -> list[tuple[int, int, int]]:
    """(K, N, int8 payload + scale bytes) of every MatMulNBits in an ONNX file, read directly."""
    model = onnx.load(path)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            out.append((a["K"], a["N"], init[node.input[1]].nbytes + init[node.input[2]].nbytes))
    return out


def test_inspect_shows_weight_bytes_and_the_quantized_layers_ratio(bundle, capsys):
    capsys.readouterr()
    assert main(["inspect", str(bundle)]) == 0
    err = capsys.readouterr().err
    q = Manifest.read(bundle).quantization.to_dict()
    table = err[err.index("weight bytes before/after w8a16") :]
    for side in ("user", "group", "full"):
        layers = _nbits_layers(bundle / f"{side}.onnx")
        assert layers, side  # each side has quantized layers
        fp32 = sum(k * n * 4 for k, n, _ in layers)
        ratio = sum(b for *_, b in layers) / fp32
        assert q["weight_bytes"][side]["quantized_layers_fp32"] == fp32
        row = next(line for line in table.splitlines() if re.match(rf"\W*{side}\b", line))
        assert f"{ratio:.4f}" in row and ("yes" if ratio <= 0.27 else "no") in row, row
        # int8 + per-channel scales: 0.25 + 1/K, and no block padding when K is a full block
        for k, n, nbytes in layers:
            if k % 64 == 0:
                assert nbytes <= 0.27 * k * n * 4, (side, k, n, nbytes)
    assert "layers: precision and measured effect" in err
    for layer in q["layers"]:
        assert layer["name"] in err and layer["effect"] is not None


def test_runtime_loads_the_checked_bundle_and_scores_like_eager(trained, bundle):
    scorer = runtime.load(bundle, backend="onnxruntime")  # the parity guard must accept it
    assert scorer.split
    rows = load_npz(trained / "heldout.npz")
    model = load_checkpoint(trained / "student").eval()
    spec = scorer.spec
    for rid in (0, 7, 99):
        idx = np.flatnonzero(rows["request_id"] == rid)
        user = {s.name: rows[s.name][idx[0]] for s in spec.user_inputs}
        cands = {s.name: rows[s.name][idx] for s in spec.group_inputs}
        got = scorer.score(user, cands)["ctr"].reshape(-1)
        with torch.no_grad():
            ref = model(**model_inputs(model, rows, idx)).numpy().reshape(-1)
        assert got.shape == ref.shape == (len(idx),)
        assert np.abs(got - ref).max() <= W8A16_MAX_ABS, rid
        assert np.corrcoef(got, ref)[0, 1] > 0.999


def test_w8a16_fixed_defaults_on_a_model_too_small_to_gain_refuse_and_name_the_flags(
    trained, tmp_path, capsys
):
    """With speed tuning off, the fixed ORT CPU defaults keep weights under 16384 elements
    fp32; every weight of the tiny two-tower is that small, so the export stops instead of
    writing a "w8a16" bundle with nothing in int8, and says how to force it."""
    out = tmp_path / "tt-w8a16-default"
    argv = ["export", str(trained / "student"), "--out", str(out), "--precision", "w8a16"]
    assert main([*argv, "--no-quant-tune"]) != 0
    err = capsys.readouterr().err
    assert "no linear layer is worth quantizing for target 'ort-cpu'" in err
    assert "--quant-min-elements 0" in err
    assert not (out / "manifest.json").exists()


def test_w8a16_default_times_each_stage_on_this_cpu_and_records_the_choice(
    trained, tmp_path, capsys
):
    """By default the ORT CPU speed choices are timed per stage (exporter.timing); the
    manifest records every configuration timed, and the bundle is what was chosen."""
    out = tmp_path / "tt-w8a16-tuned"
    argv = ["export", str(trained / "student"), "--out", str(out), "--precision", "w8a16"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    tuning = q["speed_tuning"]
    assert set(tuning["stages"]) == {"user", "group", "full", "group_small"}
    small = tuning["stages"].pop("group_small")  # the group at 1 candidate: see its own test
    assert small["batch"] == 1
    assert ("group_small" in manifest["stages"]) == bool(small["max_rows"])
    quantized = []
    for stage, r in tuning["stages"].items():
        ratios = {c["config"]: c["ratio_vs_fp32"] for c in r["configs"]}
        assert ratios["fp32"] == 1.0 and len(ratios) >= 2, (stage, ratios)
        if r["chosen"] != "fp32":
            quantized.append(stage)
            assert q["scheme"]["min_elements"][stage] == r["min_elements"]
            assert (stage in q["scheme"]["per_token_stages"]) == r["per_token"]
    built = ["group_small"] if small["max_rows"] else []
    assert quantized and sorted(q["scheme"]["stages"]) == sorted(quantized + built)
    for stage in ("user", "group", "full"):
        ops = {n.op_type for n in onnx.load(out / f"{stage}.onnx").graph.node}
        int8 = [r for r in q["layers"] if r["stage"] == stage and r["precision"] == "int8"]
        assert ("MatMulNBits" in ops) == bool(int8), (stage, ops)
        if stage not in quantized:
            assert not int8, stage
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().err
    assert "speed tuning at export" in shown
    assert shown.count("✓") == len(tuning["stages"]) + 1  # one choice per stage (+ group_small)


def test_serve_threads_sets_the_threads_the_speed_choices_are_timed_with(trained, tmp_path, capsys):
    argv = ["export", str(trained / "student"), "--precision", "w8a16"]
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "bad"), "--serve-threads", "0"])
    assert "expected an integer > 0" in capsys.readouterr().err
    out = tmp_path / "tt-1thread"
    assert main([*argv, "--out", str(out), "--serve-threads", "1", "--quant-small-batch", "off"]) == 0
    m = Manifest.read(out)
    tuning = m.quantization.to_dict()["speed_tuning"]
    assert tuning["threads"] == 1 and set(tuning["stages"]) == {"user", "group", "full"}
    # served on one thread: no stage is timed on fewer, none is capped
    assert m.optimize.stage_threads.why == "served with 1 thread: nothing to choose"
    assert not any(st.intra_op_threads for st in m.stages.values())
    # --no-stage-threads: the threads step does not run
    plain = tmp_path / "tt-no-stage-threads"
    assert main(["export", str(trained / "student"), "--out", str(plain), "--no-stage-threads"]) == 0
    m = Manifest.read(plain)
    assert m.optimize is None or m.optimize.stage_threads is None
    assert not any(st.intra_op_threads for st in m.stages.values())


def test_group_small_serves_small_calls_and_is_checked_on_its_own(trained, tmp_path, capsys):
    """--quant-small-batch 8: a second group graph (tuned at one candidate) serves group calls
    of up to 8 candidates. Parity checks it on every row (onnx-split-small), the manifest
    lists it with its bound, the runtime runs it exactly for calls within the bound, and
    its scores stay within the w8a16 budget of the eager model."""
    out = tmp_path / "tt-small"
    data = str(trained / "heldout.npz")
    argv = ["export", str(trained / "student"), "--out", str(out), "--precision", "w8a16"]
    assert main([*argv, "--data", data, "--quant-small-batch", "8"]) == 0
    m = Manifest.read(out)
    assert m.stages["group_small"].max_rows == 8 and m.small_group_rows == 8
    assert "group_small.onnx" in m.files
    small_ops = {n.op_type for n in onnx.load(out / "group_small.onnx").graph.node}
    assert "MatMulNBits" in small_ops
    q = m.quantization.to_dict()
    assert q["group_small"] == {"max_rows": 8}
    assert q["outcome"]["user+group_small"]["selected"]["passed"]
    assert q["weight_bytes"]["group_small"]["quantized_layers"] > 0
    assert any(r["stage"] == "group_small" and r["precision"] == "int8" for r in q["layers"])
    assert m.parity.passed and m.parity.summary["onnx-split-small-w8a16"]["status"] == "passed"
    parity = json.loads((out / "parity.json").read_text())
    small_stage = next(s for s in parity["stages"] if s["name"] == "onnx-split-small-w8a16")
    assert small_stage["outputs"]["ctr"]["max_abs"] <= W8A16_MAX_ABS

    scorer = runtime.load(out, backend="onnxruntime")
    assert scorer.small_rows == 8
    # threads step: user and group_small timed at batch 1 on the serving threads and fewer;
    # the faster count is the stage's cap, and the Scorer's sessions run with it
    from exporter.steps.threads import DEFAULT, pick

    timed = m.optimize.to_dict()["stage_threads"]["stages"]
    assert set(timed) == {"user", "group_small"}
    sessions = {"user": scorer.user_session, "group_small": scorer.small_session}
    for stage, r in timed.items():
        medians = {(None if k == DEFAULT else int(k)): v for k, v in r["median_ms"].items()}
        fastest = pick(medians)
        assert r["chosen"] == (DEFAULT if fastest is None else str(fastest))
        assert m.stage_threads(stage) == (None if fastest == next(iter(medians)) else fastest)
        if m.stage_threads(stage):
            got = sessions[stage]._sess.get_session_options().intra_op_num_threads
            assert got == m.stage_threads(stage), stage
    from runtime.backends.ort import OrtBackend
    from runtime.scorer import Scorer

    only = {v: Scorer(scorer.bundle, OrtBackend(), group_variant=v) for v in ("group", "group_small")}
    rows = load_npz(trained / "heldout.npz")
    model = load_checkpoint(trained / "student").eval()
    idx = np.flatnonzero(rows["request_id"] == 3)
    user = {s.name: rows[s.name][idx[0]] for s in scorer.spec.user_inputs}
    with torch.no_grad():
        ref = model(**model_inputs(model, rows, idx)).numpy().reshape(-1)
    for n, stage in ((1, "group_small"), (8, "group_small"), (9, "group"), (len(idx), "group")):
        cands = {s.name: rows[s.name][idx[:n]] for s in scorer.spec.group_inputs}
        before = dict(scorer.stage_runs)
        got = scorer.score(user, cands)["ctr"].reshape(-1)
        assert scorer.stage_runs[stage] == before.get(stage, 0) + 1, (n, stage)
        other = "group" if stage == "group_small" else "group_small"
        assert scorer.stage_runs[other] == before.get(other, 0), (n, stage)
        np.testing.assert_array_equal(got, only[stage].score(user, cands)["ctr"].reshape(-1))
        assert np.abs(got - ref[:n]).max() <= W8A16_MAX_ABS, n
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().err
    assert "group_small runs group calls of at most 8 candidates" in shown
    assert "forced (small_batch=8)" in shown
