"""Precision w8a8 through the real CLI: train -> export --precision w8a8 --data -> parity vs
eager -> manifest and inspect record the choice -> served scores equal the Python API's.

The two-tower student (tests/test_cli_e2e.py's): its towers are small, so speed tuning on
ORT CPU may keep them fp32; ``--no-quant-tune`` puts every eligible layer of the group and
full stages in w8a8 (DynamicQuantizeMatMul) and the user stage fp32, so the parity verdict
judges int8 activations on every group layer.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import tritonclient.http as triton

import runtime
from exporter.cli import main
from exporter.evaluate.budgets import DEFAULTS
from runtime.manifest import Manifest
from runtime.serving import ServerThread, build_app
from students.base import model_inputs
from students.checkpoint import load_checkpoint
from students.data import load_npz
from students.train import distill
from tests.serving.http_utils import triton_scores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("twotower-w8a8")
    distill("twotower", "tiny", out, progress=False, n_train=20_000, teacher_data_factor=1,
            max_steps=30, control=False, n_requests=100)
    return out


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tt-w8a8"
    argv = ["export", str(trained / "student"), "--out", str(out), "--data",
            str(trained / "heldout.npz"), "--precision", "w8a8", "--no-quant-tune"]
    assert main(argv) == 0
    return out


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


def test_w8a8_export_passes_parity_and_records_the_choice(trained, bundle, capsys):
    manifest = Manifest.read(bundle)
    assert manifest.precision == "w8a8"
    assert manifest.parity.passed, manifest.parity
    q = json.loads((bundle / "manifest.json").read_text())["quantization"]
    assert q["precision"] == "w8a8" and q["budget"] == DEFAULTS["w8a16"]
    assert q["scheme"]["stages"]["user"]["scheme"] == "fp32"
    assert q["scheme"]["stages"]["group"]["scheme"] == "w8a8"
    rows = [r for r in q["layers"] if r["stage"] == "group" and r["precision"] == "w8a8"]
    kernels = _ops(bundle / "group.onnx").count("DynamicQuantizeMatMul")
    assert rows and kernels == sum(r["weights"] for r in rows)  # read back from the graph
    assert "DynamicQuantizeMatMul" not in _ops(bundle / "user.onnx")
    assert "DynamicQuantizeMatMul" not in _ops(bundle / "full.onnx")  # split: full stays fp32
    assert q["scheme"]["stages"]["full"]["scheme"] == "fp32"
    # per-call activation ranges mix the rows of a group call: recorded request-scoped
    assert manifest.row_scope.group == "request", manifest.row_scope
    assert any(m.op == "DynamicQuantizeMatMul" for m in manifest.row_scope.mixing)
    # independently of the parity step: the runtime's split scores vs the eager model
    rows = load_npz(trained / "heldout.npz")
    model = load_checkpoint(trained / "student").eval()
    scorer = runtime.load(bundle, backend="onnxruntime")
    worst = 0.0
    for rid in (0, 7, 99):
        idx = np.flatnonzero(rows["request_id"] == rid)
        user = {s.name: rows[s.name][idx[0]] for s in scorer.spec.user_inputs}
        cands = {s.name: rows[s.name][idx] for s in scorer.spec.group_inputs}
        got = scorer.score(user, cands)["ctr"].reshape(-1)
        with torch.no_grad():
            ref = model(**model_inputs(model, rows, idx)).numpy().reshape(-1)
        worst = max(worst, float(np.abs(got - ref).max()))
        assert np.corrcoef(got, ref)[0, 1] > 0.999, rid
    assert 0 < worst <= DEFAULTS["w8a8"]["max_abs"], worst  # quantized, within the budget
    capsys.readouterr()
    # a request's scores do not depend on the other requests scored with it
    a, b = (np.flatnonzero(rows["request_id"] == rid) for rid in (3, 4))
    reqs = [({s.name: rows[s.name][i[0]] for s in scorer.spec.user_inputs},
             {s.name: rows[s.name][i] for s in scorer.spec.group_inputs}) for i in (a, b)]
    alone = [scorer.score(user, cands)["ctr"] for user, cands in reqs]
    assert scorer.request_scoped
    for got, want in zip(scorer.score_many(reqs), alone, strict=True):  # fp32 rounding at most
        np.testing.assert_allclose(got["ctr"], want, rtol=0, atol=1e-6)
    scorer.request_scoped = False  # what merging the two group calls would serve instead
    merged = scorer.score_many(reqs)
    assert max(float(np.abs(m["ctr"] - a).max()) for m, a in zip(merged, alone, strict=True)) > 1e-5
    assert main(["inspect", str(bundle)]) == 0
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "w8a8 per stage:" in text and "group w8a8" in text
    # the export CPU's int8 path is recorded with the weight bits it decided, and shown
    from graph_passes.onnx.w8a8 import weight_bits_for_cpu
    from runtime.cpu import cpu_flags, cpu_summary

    assert q["scheme"]["int8_dot"] == cpu_summary()["int8_dot"]
    assert q["scheme"]["weight_bits"] == weight_bits_for_cpu(cpu_flags())
    assert "int8 dot product:" in text


def test_served_w8a8_scores_equal_the_python_api(bundle):
    scorer = runtime.load(bundle, "onnxruntime")
    spec = scorer.spec
    rng = np.random.default_rng(0)
    from runtime.sample import sample_input

    with ServerThread(build_app([bundle])) as srv:
        client = triton.InferenceServerClient(f"127.0.0.1:{srv.port}")
        for n, binary in [(1, True), (37, False), (200, True)]:
            user = {s.name: sample_input(s, 1, rng) for s in spec.user_inputs}
            cands = {s.name: sample_input(s, n, rng) for s in spec.group_inputs}
            got = triton_scores(client, scorer.name, user, cands, binary=binary)
            want = scorer.score({k: v[0] for k, v in user.items()}, cands)[spec.outputs[0]]
            np.testing.assert_array_equal(got.reshape(-1), np.asarray(want).reshape(-1))


def test_w8a8_tuned_times_each_stage_and_the_graphs_follow_the_choice(trained, tmp_path):
    out = tmp_path / "tt-w8a8-tuned"
    argv = ["export", str(trained / "student"), "--out", str(out), "--precision", "w8a8",
            "--no-parity"]
    assert main(argv) == 0
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    tuning = q["speed_tuning"]
    assert tuning["timed"] and set(tuning["stages"]) == {"user", "group", "full"}
    assert tuning["stages"].pop("full")["chosen"] == "fp32"  # split bundle: full stays fp32, untimed
    assert "DynamicQuantizeMatMul" not in _ops(out / "full.onnx")
    for stage, r in tuning["stages"].items():
        schemes = {c["scheme"] for c in r["configs"]}
        assert r["configs"][0]["config"] == "fp32" and r["configs"][0]["ratio_vs_fp32"] == 1.0
        # the user stage is never w8a8 (its call merges requests' users, its outputs are cached)
        want = {"fp32", "w8a16"} if stage == "user" else {"fp32", "w8a8"}
        assert schemes == want, (stage, schemes)
        assert q["scheme"]["stages"][stage]["scheme"] == r["scheme"]
        chosen = next(c for c in r["configs"] if c["config"] == r["chosen"])
        assert chosen["median_ms"] == min(c["median_ms"] for c in r["configs"])  # the fastest
        ops = _ops(out / f"{stage}.onnx")
        assert ("DynamicQuantizeMatMul" in ops) == (r["scheme"] == "w8a8"), (stage, r["scheme"])
        assert ("MatMulNBits" in ops) == (r["scheme"] == "w8a16"), (stage, r["scheme"])


def test_w8a8_for_tensorrt_is_refused_in_one_line(trained, tmp_path, capsys):
    out = tmp_path / "tt-w8a8-trt"
    argv = ["export", str(trained / "student"), "--out", str(out), "--precision", "w8a8",
            "--target", "trt", "--no-parity"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "precision w8a8 runs ONNX Runtime CPU's DynamicQuantizeMatMul" in err
    assert "Traceback" not in err and not (out / "manifest.json").exists()


AVX2_ONLY = ["sse4_2", "avx", "avx2", "fma"]  # x86-64 without an int8 dot product (Zen 3)


@pytest.mark.parametrize("bits", [8, 7])
def test_8bit_weights_on_a_cpu_without_vnni_are_named_at_load(bundle, bits, tmp_path, monkeypatch,
                                                              caplog):
    """The export picks 8-bit weights on a VNNI CPU; served where u8s8 runs vpmaddubsw they can
    saturate int16 sums, so loading says so (7-bit weights, the non-VNNI choice, load quietly)."""
    import logging
    import shutil

    import runtime.cpu as cpu
    from runtime.manifest import Quantization

    bundle = shutil.copytree(bundle, tmp_path / "b")
    data = json.loads((bundle / "manifest.json").read_text())
    data["quantization"]["scheme"]["weight_bits"] = bits
    (bundle / "manifest.json").write_text(json.dumps(data))
    q = Quantization.from_dict(data["quantization"], "test")
    assert (cpu.int8_saturation_warning(q, AVX2_ONLY) is not None) == (bits == 8)
    assert cpu.int8_saturation_warning(q, AVX2_ONLY + ["avx512f", "avx512_vnni"]) is None
    assert cpu.int8_saturation_warning(q, ["fp", "asimd", "asimddp"]) is None  # Arm: sdot/udot

    monkeypatch.setattr(cpu, "cpu_flags", lambda: AVX2_ONLY)  # serve "on" a Zen 3
    with caplog.at_level(logging.WARNING, logger="runtime"):
        runtime.load(bundle, "onnxruntime", allow_unverified=True)
    assert ("can saturate" in caplog.text) == (bits == 8), caplog.text
