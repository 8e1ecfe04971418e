"""benchmarks/gemv_m1.py: the bound's arithmetic by hand, and the two per-token layouts it
times compute the same products (real ONNX Runtime sessions, small sizes). No timing asserts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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
