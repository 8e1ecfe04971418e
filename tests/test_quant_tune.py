"""Speed tuning of the ORT CPU quantization choices (exporter.timing, exporter.steps.quantize.speed): real graphs, real
ONNX Runtime timings; the tests check what was decided against what was measured, never a
timing threshold."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.steps.quantize import QuantizeOptions, quantize_bundle_stages, tune_for_speed
from exporter.steps.quantize.speed import FP32, choose
from exporter.timing import Config


def _chain(dims: list[int], per_token: int = 0, batch: str = "M") -> onnx.ModelProto:
    """A stage graph (M: user side, N: full): x[batch, dims[0]] through MatMul+Add+Relu layers, then (optionally) a
    per-token FFN on [M, T, D] with einsum-style batched weights."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "user_dense"
    for i, (k, n) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        inits += [
            numpy_helper.from_array((rng.standard_normal((k, n)) / k**0.5).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(np.zeros(n, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"y{i}"]),
        ]
        x = f"y{i}"
    if per_token:
        t, d = per_token, dims[-1] // per_token
        inits += [
            numpy_helper.from_array(np.array([-1, t, d], np.int64), "shape3"),
            numpy_helper.from_array(np.array([-1, t * d], np.int64), "shape2"),
            numpy_helper.from_array((rng.standard_normal((t, d, d)) / d**0.5).astype(np.float32), "wt"),
        ]
        nodes += [
            helper.make_node("Reshape", [x, "shape3"], ["x3"]),
            helper.make_node("Einsum", ["x3", "wt"], ["e"], equation="btd,tdh->bth"),
            helper.make_node("Reshape", ["e", "shape2"], ["pt"]),
        ]
        x = "pt"
    graph = helper.make_graph(
        nodes,
        "user",
        [helper.make_tensor_value_info("user_dense", TensorProto.FLOAT, [batch, dims[0]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, dims[-1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _cfg(name: str, elements: int) -> Config:
    return Config(name, None if name == FP32 else 0, False, onnx.ModelProto(), elements)


def test_choose_takes_the_fastest_then_the_smaller_bundle_never_a_slower_one():
    cfgs = [_cfg(FP32, 0), _cfg("a", 100), _cfg("b", 400)]
    # clear winner
    assert choose(cfgs, {FP32: 1.0, "a": 0.7, "b": 0.9}).name == "a"
    # speed first: b quantizes more but is slower
    assert choose(cfgs, {FP32: 1.0, "a": 0.70, "b": 0.71}).name == "a"
    # with a tolerance, the one quantizing more weight elements among the near-fastest ...
    assert choose(cfgs, {FP32: 1.0, "a": 0.70, "b": 0.71}, tie=0.02).name == "b"
    # ... but never one slower than fp32
    assert choose(cfgs, {FP32: 1.0, "a": 1.5, "b": 1.01}, tie=0.02).name == FP32
    # b ties fp32 exactly: the smaller bundle at no cost
    assert choose(cfgs, {FP32: 1.0, "a": 1.5, "b": 1.0}).name == "b"


def test_tuning_times_every_configuration_and_applies_the_measured_choice():
    # two [1024, 1024] layers (weight-bandwidth bound at batch 1) and small ones (64 x 256,
    # 16k elements; 256 x 64) and a per-token FFN: the grid's configurations differ here
    proto = _chain([64, 256, 1024, 1024, 64], per_token=4)
    opts, record = tune_for_speed({"user": proto}, QuantizeOptions())
    r = record["stages"]["user"]
    assert r["batch"] == 1 and record["cpu"]
    rows = {c["config"]: c for c in r["configs"]}
    assert rows[FP32]["ratio_vs_fp32"] == 1.0
    # every grid point that quantizes a distinct set of weights was built, run and timed
    assert len(rows) >= 4
    assert all(c["median_ms"] > 0 and c["layers"] > 0 for n, c in rows.items() if n != FP32)
    # the choice is the rule applied to the medians recorded
    cfgs = [Config(n, c["min_elements"], c["per_token"], onnx.ModelProto(), c["quantized_elements"])
            for n, c in rows.items()]
    expected = choose(cfgs, {n: c["median_ms"] for n, c in rows.items()})
    if "fallback" not in record:
        assert r["chosen"] == expected.name
    else:  # fp32 was fastest: the stage takes its fastest quantized configuration
        assert expected.name == FP32
        assert r["chosen"] == min((n for n in rows if n != FP32), key=lambda n: rows[n]["median_ms"])
    # ... and the options now carry it
    assert opts.tune is False and "user" in opts.stages
    assert opts.stage_min_elements == {"user": r["min_elements"]}
    assert opts.per_token_stages == (("user",) if r["per_token"] else ())


def test_tuned_quantization_builds_the_chosen_graph_and_records_the_table():
    proto = _chain([64, 1024, 1024, 64], batch="N")
    out, record = quantize_bundle_stages({"full": proto}, None, options=QuantizeOptions())
    tuning = record["speed_tuning"]["stages"]["full"]
    assert tuning["batch"] == 256
    assert record["scheme"]["min_elements"] == {"full": tuning["min_elements"]}
    ops = [n.op_type for n in out["full"].graph.node]
    rows = [r for r in record["layers"] if r["precision"] == "int8"]
    assert ops.count("MatMulNBits") == len(rows) > 0
    for r in record["layers"]:  # every layer left fp32 says it was the stage's speed choice
        if r["precision"] == "fp32":
            assert r["why"].startswith("speed: ") and f"min_elements={tuning['min_elements']}" in r["why"]
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"user_dense": x})[0]
    got = ort.InferenceSession(out["full"].SerializeToString()).run(None, {"user_dense": x})[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("knob", [{"min_elements": 0}, {"per_token_stages": ("user",)}])
def test_an_explicit_knob_is_the_users_choice_and_nothing_is_timed(knob):
    out, record = quantize_bundle_stages(
        {"full": _chain([64, 1024, 64], batch="N")}, None, options=QuantizeOptions(**knob)
    )
    assert "speed_tuning" not in record
    assert any(n.op_type == "MatMulNBits" for n in out["full"].graph.node)


def test_fp32_per_token_layout_is_timed_and_the_choice_is_what_was_measured():
    """exporter.steps.optimize: per-token weights stay one batched MatMul or are unrolled into 2-D
    GEMMs, whichever ran faster here (geometric mean over 1 thread and ORT's default)."""
    from exporter.steps.optimize import choose_per_token_layout, unrolled_fp32

    plain = _chain([64, 256])  # no per-token weight: nothing to choose
    assert unrolled_fp32(plain) is None
    assert choose_per_token_layout("user", plain) == (plain, None)

    proto = _chain([64, 256], per_token=4, batch="N")
    out, record = choose_per_token_layout("group", proto)
    assert record["batch"] == 256 and set(record["threads"]) >= {"1"}
    ratios = [v["ratio"] for v in record["threads"].values()]
    assert all(v["batched_ms"] > 0 and v["unrolled_ms"] > 0 for v in record["threads"].values())
    geo = float(np.exp(np.mean(np.log(ratios))))
    assert record["unrolled_vs_batched"] == pytest.approx(geo, rel=1e-3)
    assert record["chosen"] == ("unrolled" if geo < 1 else "batched")
    ops = [n.op_type for n in out.graph.node]
    assert ("Einsum" in ops) == (record["chosen"] == "batched")
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"user_dense": x})[0]
    unrolled = unrolled_fp32(proto)
    got = ort.InferenceSession(unrolled.SerializeToString()).run(None, {"user_dense": x})[0]
    assert np.abs(got - ref).max() < 1e-5


def _expected_max_rows(rows: list[dict]) -> int:
    """The crossover rule applied to recorded timings: the last N before the first loss."""
    best = 0
    for r in rows:
        if r["ratio"] >= 1.0:
            break
        best = r["candidates"]
    return best


def test_crossover_times_both_graphs_at_growing_n_and_stops_at_the_first_loss():
    from exporter.timing import crossover

    fp32 = _chain([64, 1024, 1024, 64], batch="N")
    int8 = quantize_bundle_stages(
        {"full": fp32}, None, options=QuantizeOptions(min_elements=0, per_token_stages=())
    )[0]["full"]
    grid = (1, 4, 16, 256)
    max_rows, rows = crossover(int8, fp32, grid=grid, budget_s=0.3)
    assert [r["candidates"] for r in rows] == list(grid[: len(rows)]) and rows
    for r in rows:
        assert r["small_ms"] > 0 and r["large_ms"] > 0
        assert r["ratio"] == pytest.approx(r["small_ms"] / r["large_ms"], rel=1e-2)
    assert all(r["ratio"] < 1.0 for r in rows[:-1])  # it stopped at the first loss, if any
    assert max_rows == _expected_max_rows(rows)


def test_group_is_tuned_at_one_candidate_too_and_group_small_follows_what_was_measured():
    """The group stage is tuned at 256 candidates and again at 1; a different, faster choice
    at 1 is timed against the large-batch graph at growing N (exporter.timing.crossover) and the
    options carry ``group_small_rows``: every branch is the rule applied to recorded timings."""
    stages = {"user": _chain([64, 256]), "group": _chain([64, 1024, 1024, 64], batch="N")}
    opts, record = tune_for_speed(stages, QuantizeOptions())
    large, small = record["stages"]["group"], record["stages"]["group_small"]
    assert large["batch"] == 256 and small["batch"] == 1 and small["why"]
    rows = {c["config"]: c for c in small["configs"]}
    cfgs = [Config(n, c["min_elements"], c["per_token"], onnx.ModelProto(), c["quantized_elements"])
            for n, c in rows.items()]
    assert small["chosen"] == choose(cfgs, {n: c["median_ms"] for n, c in rows.items()}).name
    if small["chosen"] in (FP32, large["chosen"]):
        assert small["max_rows"] == 0 and "crossover" not in small
    else:
        assert small["max_rows"] == _expected_max_rows(small["crossover"])
        assert small["crossover"][0]["candidates"] == 1
    assert opts.group_small_rows == small["max_rows"]
    assert ("group_small" in opts.stages) == bool(small["max_rows"])
    if small["max_rows"]:
        assert opts.min_elements_for("group_small") == small["min_elements"]
    # off: not even timed
    opts_off, rec_off = tune_for_speed(stages, QuantizeOptions(small_batch=0))
    assert "group_small" not in rec_off["stages"] and opts_off.group_small_rows == 0
    # forced: built for up to K candidates with the fastest quantized configuration at 1
    opts_k, rec_k = tune_for_speed(stages, QuantizeOptions(small_batch=8))
    forced = rec_k["stages"]["group_small"]
    quantized = {n: c for n, c in ((c["config"], c) for c in forced["configs"]) if n != FP32}
    assert forced["chosen"] == min(quantized, key=lambda n: quantized[n]["median_ms"])
    assert forced["max_rows"] == 8 and "forced" in forced["why"]
    assert opts_k.group_small_rows == 8 and "group_small" in opts_k.stages
    with pytest.raises(Exception, match="small_batch must be"):
        QuantizeOptions(small_batch=-1)


def test_serve_threads_times_the_layout_with_the_serving_thread_count_only(tmp_path):
    """export --serve-threads N: optimize times the per-token layouts with N intra-op threads
    only and records N in manifest.optimize (default: 1 thread and ORT's default)."""
    from exporter.pipeline import ExportContext, ExportOptions
    from exporter.steps.optimize import step_optimize

    proto = _chain([64, 256], per_token=4, batch="N")
    for threads, timed in ((2, {"2"}), (None, {"1", "default"})):
        ctx = ExportContext(loaded=None, out_dir=tmp_path, options=ExportOptions(serve_threads=threads))
        ctx.stages = {"group": proto}
        step_optimize(ctx)
        rec = ctx.manifest_fields["optimize"]
        assert rec.serve_threads == threads
        assert set(rec.per_token_layout["group"].threads) == timed


def test_the_choice_is_made_on_the_recorded_figures():
    """Two medians 0.01 ns apart at batch 1: raw, the quantized one is "slower than fp32" and
    loses; the record shows both as 0.0100 ms, where it ties fp32 and wins (more elements).
    The tuner decides on the recorded figures, so a reader recomputing it agrees."""
    from exporter.timing import recorded_medians

    cfgs = [_cfg(FP32, 0), _cfg("a", 100)]
    raw = {FP32: 1.000000004e-5, "a": 1.000000005e-5}
    assert choose(cfgs, raw).name == FP32
    shown = {k: round(v * 1e3, 4) for k, v in recorded_medians(raw).items()}  # median_ms
    assert shown == {FP32: 0.01, "a": 0.01}
    assert choose(cfgs, recorded_medians(raw)).name == choose(cfgs, shown).name == "a"


def test_time_configs_returns_the_figures_the_records_show():
    """Every tuner (threads, optimize, moe_form, crossover, w8a16, w8a8) chooses from
    time_configs' medians and records them as ``median_ms`` to 4 decimals: the medians it
    returns are already at that resolution, so a choice recomputed from any record agrees."""
    from exporter.timing import recorded_medians, time_configs

    configs = [Config("a", None, False, _chain([16, 32, 16])), Config("b", None, False, _chain([16, 64, 16]))]
    med = time_configs(configs, 1, threads=1, budget_s=0.05)
    assert set(med) == {"a", "b"} and all(v > 0 for v in med.values())
    assert recorded_medians(med) == med
    assert {k: round(v * 1e3, 4) / 1e3 for k, v in med.items()} == med
