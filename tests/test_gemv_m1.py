"""benchmarks/gemv_m1.py: the bound's arithmetic by hand, and the two per-token layouts it
times compute the same products (real ONNX Runtime sessions, small sizes). No timing asserts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gemv_m1", ROOT / "benchmarks" / "gemv_m1.py")
gm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gm
_spec.loader.exec_module(gm)


def test_best_gemv_bound_by_hand():
    # 30 MB at 30 GB/s = 1 ms of user; split 1 + 2 = 3 ms; full 9 ms -> 3x of a 4x ceiling
    b = gm.best_gemv_bound(full_ms=9.0, group_ms=2.0, user_bytes=30_000_000, gb_per_s=30.0, ceiling=4.0)
    assert b["user_ms"] == pytest.approx(1.0)
    assert b["fraction"] == pytest.approx(0.75)
    # 0.8 of 4x = 3.2x: split 9 / 3.2 = 2.8125 ms, minus the 1 ms user side
    assert b["group_ms_for_0_8"] == pytest.approx(1.8125)
    # a split faster than the ceiling promises is capped at 1
    assert gm.best_gemv_bound(9.0, 0.5, 3_000_000, 30.0, 4.0)["fraction"] == 1.0


@pytest.mark.parametrize("m", [1, 3])
def test_per_token_layouts_agree_and_report_both(m):
    # per_token_layouts itself asserts the unrolled and batched graphs give the same y
    r = gm.per_token_layouts(threads=1, rounds=2, m=m, tokens=3, d=8, f=16, layers=2)
    assert r["m"] == m
    assert r["weight_bytes"] == 2 * 3 * (8 * 16 + 16 * 8) * 4
    assert set(r["ms"]) == {"unrolled", "batched"}
    assert all(v > 0 for v in r["ms"].values()) and r["batched_over_unrolled"] > 0


def test_gemv_rates_checks_every_onnx_runtime_variant_against_numpy():
    # gemv_rates asserts both ORT sessions (prepacked and not) give numpy's products
    r = gm.gemv_rates(threads=1, rounds=2, k=32, n=24, count=3)
    assert r["shape"] == [1, 32, 24] and r["matrices"] == 3
    assert set(r["gb_per_s"]) == {"onnxruntime_matmul", "onnxruntime_matmul_no_prepack", "numpy", "torch_linear"}


def test_boundary_free_flops_counts_by_hand():
    # cand [N,4] @ W1[4,8] needs no boundary; u [M,4] @ W2[4,8] does, and so does everything after
    # the Add that joins them; a Gemm with transA=1 checks K is read from the right axis.
    w = lambda name, *shape: numpy_helper.from_array(np.ones(shape, np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("MatMul", ["cand", "W1"], ["c1"]),             # free: 2·N·8·4
        helper.make_node("Gemm", ["candT", "W4"], ["c2"], transA=1),    # free: [4,N]^T @ [4,8] → 2·N·8·4
        helper.make_node("MatMul", ["u", "W2"], ["u1"]),                # waits: 2·1·8·4
        helper.make_node("Add", ["c1", "u1"], ["h"]),                   # waits
        helper.make_node("Add", ["h", "c2"], ["h2"]),                   # waits
        helper.make_node("MatMul", ["h2", "W3"], ["y"]),                # waits: 2·N·2·8
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("cand", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("candT", TensorProto.FLOAT, [4, "N"]),
         helper.make_tensor_value_info("u", TensorProto.FLOAT, ["M", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [w("W1", 4, 8), w("W2", 4, 8), w("W3", 8, 2), w("W4", 4, 8)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    r = gm.boundary_free_flops(model, {"u"}, n=5)
    assert (r["nodes"], r["free_nodes"]) == (6, 2)
    assert r["free_flops"] == 2 * (2 * 5 * 8 * 4)
    assert r["flops"] == 2 * (2 * 5 * 8 * 4) + 2 * 1 * 8 * 4 + 2 * 5 * 2 * 8
    assert r["free_flop_share"] == pytest.approx(640 / (640 + 64 + 160))
    # the caller's model is not modified (its dims stay symbolic)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_roofline_bounds_by_hand():
    # 4 + 1 MFLOP per row at N=16: ceiling (4+1) / (4/16 + 1) = 4x
    med = {"full_t1": 10.0, "stream_t1": 2.0, "group_t1": 2.5,
           "full_t2": 8.0, "stream_t2": 1.0, "group_t2": 1.5}
    r = gm.roofline_bounds(med, n=16, ceiling=4.0, user_per_row=4e6, group_per_row=1e6,
                           user_bytes=30_000_000)
    # 1 thread: full rate 80 MFLOP / 10 ms; user streams 2 ms (> its 0.5 ms of FLOPs), group
    # 16 MFLOP at that rate 2 ms: split 4 ms, speedup 2.5x of 4x
    assert r["t1"]["fraction"] == pytest.approx(0.625)
    assert r["t1"]["stream_gb_per_s"] == pytest.approx(15.0)
    assert r["t1"]["full_gflops"] == pytest.approx(8.0)
    # 2 threads: rate 10 MFLOP/ms; split 1 + 1.6 = 2.6 ms; 8 / 2.6 / 4
    assert r["t2"]["fraction"] == pytest.approx(8 / 2.6 / 4, abs=1e-4)
    # 0.8 of 4x = 3.2x: split 10 / 3.2 = 3.125 ms, minus the measured 2.5 ms group stage
    assert r["t1"]["user_ms_for_0_8"] == pytest.approx(0.625)
    assert r["t2"]["user_ms_for_0_8"] == pytest.approx(8 / 3.2 - 1.5)
    # a stream faster than the user's FLOPs at the full rate: the FLOPs bound it, capped at 1
    fast = gm.roofline_bounds({**med, "stream_t2": 0.01}, 16, 4.0, 4e6, 1e6, 30_000_000)
    assert fast["t2"]["fraction"] == 1.0
