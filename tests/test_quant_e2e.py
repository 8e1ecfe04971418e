"""Sensitivity-guided quantization of exported stages, against the eager fp32 model.

A small per-token-FFN ranker (einsum weights, as RankMixer students write them) goes
through torch.export -> ONNX -> exporter.steps.quantize; every comparison is with the eager
model's outputs on held-out rows.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporter.steps.capture import capture, flat_input_names, to_torch_inputs
from exporter.steps.onnx_build import export_onnx
from exporter.steps.quantize import (
    Calibration,
    QuantizeOptions,
    budget_damage,
    quantize_bundle_stages,
)
from graph_passes.onnx.pipelines import NBITS_MIN_ELEMENTS
from runtime.sample import sample_requests, sample_rows
from runtime.spec import FeatureSpec

SPEC = FeatureSpec.from_dict(
    {
        "name": "tokens",
        "inputs": [
            {"name": "user_dense", "side": "user", "dtype": "float32", "shape": [12]},
            {"name": "item_dense", "side": "group", "dtype": "float32", "shape": [4]},
        ],
        "outputs": ["ctr"],
    }
)
EVERY_LAYER = {"min_elements": 0, "per_token_stages": ("full", "user", "group")}


class PerTokenRanker(torch.nn.Module):
    """Linear tokeniser -> per-token FFN (einsum on [T, D, H] weights) -> linear head."""

    def __init__(self, t: int = 4, d: int = 64, h: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.t, self.d = t, d
        self.tok = torch.nn.Linear(16, t * d)
        self.w1 = torch.nn.Parameter(torch.randn(t, d, h) / d**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(t, h, d) / h**0.5)
        self.head = torch.nn.Linear(t * d, 1)

    def forward(self, user_dense, item_dense):
        x = self.tok(torch.cat([user_dense, item_dense], 1)).view(-1, self.t, self.d)
        x = x + torch.einsum(
            "bth,thd->btd", torch.einsum("btd,tdh->bth", x, self.w1).relu(), self.w2
        )
        return torch.sigmoid(self.head(x.flatten(1))).squeeze(-1)


@pytest.fixture(scope="module")
def exported():
    model = PerTokenRanker().eval()
    program = capture(model, SPEC)
    names = flat_input_names(SPEC, to_torch_inputs(SPEC, sample_rows(SPEC, 1)))
    full = export_onnx(program, names, ["ctr"])
    rows, rid = sample_requests(SPEC, 6, 100, seed=3)
    with torch.no_grad():
        ref = model(**to_torch_inputs(SPEC, rows)).numpy()
    labels = (np.random.default_rng(0).random(len(ref)) < ref).astype(np.float32)
    return model, full, Calibration(rows, {"ctr": ref}, labels, rid)


@pytest.fixture(scope="module")
def default_w8a16(exported):
    _, full, calib = exported
    # every layer of this tiny model a candidate (on ORT CPU the default keeps weights under
    # NBITS_MIN_ELEMENTS and per-token weights outside the user side in fp32 for speed)
    opts = QuantizeOptions(**EVERY_LAYER)
    return quantize_bundle_stages({"full": full}, SPEC, options=opts, calibration=calib)


def _run(proto: onnx.ModelProto, rows) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: rows[i.name] for i in sess.get_inputs()})[0]


def test_w8a16_meets_default_budget_and_shrinks_weights(exported, default_w8a16):
    _, _, calib = exported
    out, record = default_w8a16
    ops = [n.op_type for n in out["full"].graph.node]
    assert "MatMulNBits" in ops and "Einsum" not in ops and "Gemm" not in ops
    onnx.checker.check_model(out["full"])
    outcome = record["outcome"]["full"]
    assert outcome["selected"]["passed"], outcome["selected"]["breaches"]
    assert {r["name"] for r in record["layers"]} == {
        "full:tok.weight_kn",
        "full:w1",
        "full:w2",
        "full:head.weight_kn",
    }
    assert all(r["effect"]["max_abs"] > 0 for r in record["layers"])
    assert {r["name"] for r in record["layers"] if r["precision"] == "fp32"} == set(
        record["kept_float"]
    )
    assert len(record["kept_float"]) < len(record["layers"])
    wb = record["weight_bytes"]["full"]
    assert wb["layers"] == 10  # 2 linears + 2 x 4 per-token weights
    assert wb["quantized_layers"] >= 1
    # int8 + scales; the noise-aware selection quantizes all 10 here, the 1-column head too,
    # whose per-block scales weigh more per weight (0.271 in all)
    assert wb["quantized_layers_bytes"] / wb["quantized_layers_fp32"] <= 0.28
    # the recorded outcome is what the quantized graph really does, vs eager
    got = _run(out["full"], calib.rows)
    assert np.abs(got - calib.reference["ctr"]).max() == pytest.approx(
        outcome["selected"]["outputs"]["ctr"]["max_abs"], rel=1e-5
    )


def test_selection_keeps_most_damaging_layers_in_float_to_meet_a_tight_budget(
    exported, default_w8a16
):
    _, full, calib = exported
    _, loose = default_w8a16
    everything = loose["outcome"]["full"]["all_quantized"]["outputs"]["ctr"]["max_abs"]
    # just above the least damaging layer alone: reachable, but not with everything quantized
    least = min(r["effect"]["max_abs"] for r in loose["layers"])
    assert everything > 1.01 * least
    budget = {"max_abs": 1.01 * least, "abs_delta_auc": 1.0, "top10_overlap_mean": 0.0}
    out, record = quantize_bundle_stages(
        {"full": full},
        SPEC,
        options=QuantizeOptions(budget=budget, **EVERY_LAYER),
        calibration=calib,
    )
    outcome = record["outcome"]["full"]
    assert not outcome["all_quantized"]["passed"]
    assert outcome["selected"]["passed"]
    kept = record["kept_float"]
    assert 0 < len(kept) < len(record["layers"])
    # ranked by the share of the budget each layer uses alone (here: max_abs / its limit)
    damage = {r["name"]: r["effect"]["max_abs"] / budget["max_abs"] for r in record["layers"]}
    ranked = sorted(damage, key=damage.get, reverse=True)
    assert set(kept) == set(ranked[: len(kept)])
    got = _run(out["full"], calib.rows)
    assert np.abs(got - calib.reference["ctr"]).max() <= budget["max_abs"]


def test_w4a16_and_gpu_targets(exported):
    _, full, calib = exported
    out4, rec4 = quantize_bundle_stages(
        {"full": full},
        SPEC,
        options=QuantizeOptions(precision="w4a16", min_elements=0),
        calibration=None,
    )
    assert rec4["scheme"]["bits"] == 4 and rec4["layers"][0]["precision"] == "int4"
    bits = [
        a.i
        for n in out4["full"].graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "bits"
    ]
    assert bits and set(bits) == {4}
    gpu, _ = quantize_bundle_stages(
        {"full": full}, SPEC, options=QuantizeOptions(target="gpu"), calibration=None
    )
    ops = [n.op_type for n in gpu["full"].graph.node]
    assert "DequantizeLinear" in ops and "MatMulNBits" not in ops
    got = _run(gpu["full"], calib.rows)
    assert np.abs(got - calib.reference["ctr"]).max() < 0.02


class TwoSide(torch.nn.Module):
    """A user tower (hoistable to user.onnx) crossed with an item tower, then a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.user = torch.nn.Sequential(
            torch.nn.Linear(12, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)
        )
        self.item = torch.nn.Linear(4, 64)
        self.head = torch.nn.Linear(64, 1)

    def forward(self, user_dense, item_dense):
        return torch.sigmoid(self.head(self.user(user_dense) * self.item(item_dense))).squeeze(-1)


def test_export_bundle_w8a16_writes_quantized_split_stages_and_manifest(tmp_path):
    from exporter import ExportOptions, LoadedModel, export_bundle
    from exporter.steps.quantize import QuantizeStepOptions
    from runtime.manifest import Manifest

    model = TwoSide().eval()
    rows, rid = sample_requests(SPEC, 8, 100, seed=5)
    opts = ExportOptions(
        precision="w8a16",
        parity=False,
        data={**rows, "request_id": rid},
        parity_rows=200,
        quantize=QuantizeStepOptions(min_elements=0),  # the tiny towers sit below the ORT CPU default
    )
    ctx = export_bundle(LoadedModel(spec=SPEC, module=model), tmp_path / "b", opts)
    m = Manifest.read(tmp_path / "b")
    assert m.precision == "w8a16" and m.is_split
    q = m.quantization.to_dict()
    assert set(q["weight_bytes"]) == {"user", "group", "full"}
    for side in ("user", "group"):
        ops = {n.op_type for n in onnx.load(tmp_path / "b" / f"{side}.onnx").graph.node}
        quantized = q["weight_bytes"][side]["quantized_layers"]
        assert ("MatMulNBits" in ops) == (quantized > 0)
    assert q["weight_bytes"]["user"]["quantized_layers"] >= 1  # the user tower's Linears
    assert q["outcome"]["user+group"]["selected"]["passed"]
    # the written split stages, run like the runtime, stay within the budget of eager
    users = {"user_dense": rows["user_dense"][::100]}
    user_index = np.repeat(np.arange(8), 100)
    su = ort.InferenceSession(str(tmp_path / "b" / "user.onnx"), providers=["CPUExecutionProvider"])
    sg = ort.InferenceSession(
        str(tmp_path / "b" / "group.onnx"), providers=["CPUExecutionProvider"]
    )
    boundary = dict(zip([o.name for o in su.get_outputs()], su.run(None, users), strict=True))
    feeds = {"item_dense": rows["item_dense"], "user_index": user_index, **boundary}
    got = sg.run(None, {i.name: feeds[i.name] for i in sg.get_inputs()})[0]
    with torch.no_grad():
        ref = model(**to_torch_inputs(SPEC, rows)).numpy()
    assert np.abs(got - ref).max() <= q["budget"]["max_abs"]
    assert ctx.stages["user"] is not None


def test_min_elements_keeps_small_weights_fp32_for_speed_and_says_why(exported):
    _, full, calib = exported
    out, record = quantize_bundle_stages(
        {"full": full}, SPEC, options=QuantizeOptions(min_elements=4096, per_token_stages=("full",)),
        calibration=None,
    )
    # tok [16, 256] (4096) and w1/w2 per token [64, 64] (4096) reach it; head [256, 1] not
    assert record["scheme"]["min_elements"] == 4096
    assert record["kept_float_for_speed"] == ["full:head.weight_kn"]
    row = next(r for r in record["layers"] if r["name"] == "full:head.weight_kn")
    assert row["precision"] == "fp32" and row["why"].startswith(
        "speed: 256 elements < min_elements=4096"
    )
    assert {r["kernel"] for r in record["layers"] if r["precision"] == "int8"} == {
        "MatMulNBits(bits=8, accuracy_level=4)"
    }
    nbits = [n for n in out["full"].graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1 + 2 * 4  # tok + w1, w2 per token; the head stays a float MatMul
    # the measured ORT CPU choices are the defaults there; on GPU every layer is a candidate
    assert NBITS_MIN_ELEMENTS == 16384
    assert QuantizeOptions().min_elements == NBITS_MIN_ELEMENTS
    assert QuantizeOptions().per_token_stages == ("user",)
    assert QuantizeOptions(target="gpu").min_elements == 0
    assert QuantizeOptions(target="gpu").per_token_stages == ("full", "user", "group")
    # ... and timed per stage on this CPU unless a knob is given (exporter.timing)
    assert QuantizeOptions().tune is True
    assert QuantizeOptions(min_elements=0).tune is False
    assert QuantizeOptions(per_token_stages=()).tune is False
    assert QuantizeOptions(target="gpu").tune is False
    got = _run(out["full"], calib.rows)
    assert np.abs(got - calib.reference["ctr"]).max() < 0.02


def test_budget_damage_is_the_share_of_the_tightest_limit():
    limits = {"max_abs": 0.05, "abs_delta_auc": 1e-4, "top10_overlap_mean": 0.95}
    shift = {"outputs": {"ctr": {"max_abs": 3e-4, "mean_abs": 5e-5, "abs_delta_auc": 3e-5}}}
    shift["outputs"]["ctr"]["top10_overlap_mean"] = 1.0
    reorder = {"outputs": {"ctr": {"max_abs": 3e-4, "mean_abs": 8e-5, "abs_delta_auc": 2e-5}}}
    reorder["outputs"]["ctr"]["top10_overlap_mean"] = 0.72
    assert budget_damage(shift, limits) == pytest.approx((0.3, 5e-5))
    assert budget_damage(reorder, limits) == pytest.approx((0.28 / 0.05, 8e-5))


def test_fixed_defaults_that_leave_nothing_to_quantize_stop_the_export_and_say_how(
    exported,
):
    from exporter.errors import ExportError

    _, full, calib = exported
    # every weight of this model is under NBITS_MIN_ELEMENTS: on ORT CPU quantizing them is
    # slower than fp32, and a "w8a16" bundle with nothing in int8 would be a lie
    with pytest.raises(ExportError, match="no linear layer is worth quantizing") as err:
        quantize_bundle_stages(
            {"full": full}, SPEC, options=QuantizeOptions(tune=False), calibration=calib
        )
    assert "--quant-min-elements 0" in str(err.value)
    assert "min_elements=16384" in str(err.value)
