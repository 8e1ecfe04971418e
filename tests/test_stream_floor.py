"""benchmarks/stream_floor.py: which weights a call reads whole, and the bound they put on the split.

Expected values are worked out by hand from the graphs and numbers built here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("stream_floor", ROOT / "benchmarks" / "stream_floor.py")
sf = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sf
_spec.loader.exec_module(sf)


def test_weight_bytes_counts_matrices_not_lookup_tables(tmp_path):
    table = numpy_helper.from_array(np.zeros((1000, 16), np.float32), "table")  # 64,000 B, rows only
    w = numpy_helper.from_array(np.zeros((16, 8), np.float32), "w")  # 512 B
    b = numpy_helper.from_array(np.zeros((8,), np.float32), "b")  # 32 B
    q = numpy_helper.from_array(np.zeros((8, 4), np.int8), "q")  # 32 B, int8
    shape = numpy_helper.from_array(np.array([-1, 16], np.int64), "shape")  # 16 B, a Reshape input
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("Reshape", ["e", "shape"], ["e2"]),
        helper.make_node("MatMul", ["e2", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["h2"]),
        helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h2", "qf"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table, w, b, q, shape])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    assert sf.weight_bytes(path) == 512 + 32 + 32 + 16


def test_fraction_bound_by_hand():
    flops = {"user_per_row": 30, "group_per_row": 10}
    # N=16, full 16 ms: rate = 16 * 40 / 16 = 40 FLOPs/ms; user FLOP time 0.75 ms, group 4 ms
    row = {"n": 16, "full_ms": 16.0, "ceiling": (30 + 10) / (30 / 16 + 10)}
    # the stream floor below the user's FLOP time: nothing binds
    assert sf.fraction_bound(row, flops, stream_ms=0.5) == pytest.approx(1.0)
    # a 2 ms floor: the split takes at least 2 + 4 = 6 ms -> 16/6 = 2.667x of a 3.368x ceiling
    assert sf.fraction_bound(row, flops, stream_ms=2.0) == pytest.approx((16 / 6) / (40 / 11.875))


def test_stream_floor_times_both(tmp_path):
    out = sf.stream_floor(lambda: None, 4 * 4096 * 64, threads=1, repeats=5)
    assert out["user_weight_bytes"] == 4 * 4096 * 64 and out["repeats"] == 5
    assert out["stream_ms"] > 0 and out["user_m1_ms"] >= 0
    assert out["stream_gb_per_s"] == pytest.approx(out["user_weight_bytes"] / out["stream_ms"] / 1e6)
