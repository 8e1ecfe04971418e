"""benchmarks/run_all.py: the summary is built from the committed result files, as they are.

Real files, real parsing: if a benchmark changes the schema of its JSON so that the summary
can no longer be built, these tests fail. No timing assertions.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMITTED = ("split", "gemv_m1", "quant", "quant_accuracy_level", "serve", "moe")


def _load_runner():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


run_all = _load_runner()


def _raw(name: str) -> dict:
    return json.loads((RESULTS / run_all.BY_NAME[name].result).read_text())


@pytest.fixture(scope="module")
def summary() -> dict:
    return run_all.collect(RESULTS)


def test_every_committed_result_is_summarised(summary):
    for name in COMMITTED:
        assert (RESULTS / run_all.BY_NAME[name].result).exists(), name
        assert "summary" in summary[name], f"{name}: {summary[name]}"
    for name, entry in summary.items():  # a file that is present is never silently skipped
        present = (RESULTS / run_all.BY_NAME[name].result).exists()
        assert entry.get("missing", False) is not present


def test_split_summary_matches_the_file(summary):
    raw = {str(r["n"]): r for r in _raw("split")["results"]}
    per_n = summary["split"]["summary"]["per_n"]
    assert set(per_n) == set(raw)
    for n, r in per_n.items():
        assert r["speedup"] == raw[n]["speedup"]
        assert r["ceiling"] == raw[n]["ceiling"]


def test_quant_summary_matches_the_file(summary):
    raw = _raw("quant")
    variants = summary["quant"]["summary"]["variants"]
    assert "fp32" in variants and "ours-w8a16" in variants
    assert variants["fp32"]["latency_ratio_n1"] == 1.0
    ours = variants["ours-w8a16"]
    assert ours["latency_ratio_n512"] == raw["latency"]["N=512"]["ours-w8a16"]["ratio_vs_fp32"]
    assert ours["top10_overlap"] == raw["accuracy"]["ours-w8a16"]["top10_overlap_mean"]
    stages = raw["weight_bytes"]["ours-w8a16"].values()
    assert ours["bytes_ratio"] == sum(s["quantized"] for s in stages) / sum(
        s["fp32"] for s in stages
    )
    assert 0 < ours["bytes_ratio"] < 1  # int8 weights are smaller than their fp32


def test_serve_summary_has_ratio_and_p99_per_concurrency(summary):
    raw = _raw("serve")
    s = summary["serve"]["summary"]
    ugsep = s["vs_eager"]["ugsep"]
    assert set(ugsep) == {str(r["concurrency"]) for r in raw["summary"]}
    for conc, r in ugsep.items():
        assert (
            r["candidates_per_s_ratio"]
            == raw["paired_ratios"]["ugsep"][conc]["candidates_per_s_ratio"]
        )
        assert r["p99_ratio"] == raw["paired_ratios"]["ugsep"][conc]["p99_ratio"]
    assert s["flop_ceiling_split"] == raw["flop_ceiling_split"]


def test_moe_summary_matches_the_file(summary):
    raw = _raw("moe")
    s = summary["moe"]["summary"]
    assert s["dense_over_sparse_e16_k2_n200"] == raw["dense_over_sparse_e16_k2_n200"]
    assert s["w8_over_fp32_user_m1"] == raw["w8_over_fp32_user_m1"]
    assert len(s["configs"]) == len(raw["configs"])
    for c in raw["configs"]:
        row = s["configs"][f"E={c['experts']} k={c['top_k']}"]
        assert row["dense_over_sparse_n200"] == c["dense_over_sparse_n200"]
        assert row["w8_over_fp32_user_m1"] == c["w8_over_fp32_user_m1"]


def test_moe_quick_mode_runs_the_headline_config_only(tmp_path):
    quick = run_all.BY_NAME["moe"].args(run_all.Context(True, tmp_path, tmp_path, None))
    full = run_all.BY_NAME["moe"].args(run_all.Context(False, tmp_path, tmp_path, None))
    q = " ".join(quick)
    assert "--experts 16" in q and "--top-k 2" in q and "--rounds 3" in q
    assert full == ["--out", str(tmp_path / "bench_moe.json")]  # the committed defaults
    assert "moe" in run_all.NO_STUDENT  # random-init student: no checkpoint to train first


def test_gemv_m1_summary_matches_the_file(summary):
    raw = _raw("gemv_m1")
    s = summary["gemv_m1"]["summary"]
    assert s["gemv_gb_per_s"] == raw["gemv"]["gb_per_s"]
    assert s["per_token_batched_over_unrolled"] == {
        "m1": raw["per_token"]["m1"]["batched_over_unrolled"],
        "m16": raw["per_token"]["m16"]["batched_over_unrolled"]}
    bound = raw["n16"]["fraction_of_ceiling_n16_best_gemv_bound"]
    assert s["n16"]["fraction_of_ceiling_n16_best_gemv_bound"] == bound
    md = run_all.to_markdown({"gemv_m1": summary["gemv_m1"]})
    assert f"at most {bound:.0%}" in md
    share = raw["n16"]["group_boundary_free"]["free_flop_share"]
    assert s["group_boundary_free_flop_share"] == share
    assert f"could overlap it on another core): {share:.1%}" in md
    roof = raw["n16"]["roofline"]
    assert s["roofline"] == roof
    for t, r in roof.items():
        assert (f"{t[1:]} thread(s): user weights stream in {r['stream_ms']:.2f} ms" in md
                and f"user stage in {r['user_ms_for_0_8']:.2f} ms, roofline {r['fraction']:.0%}" in md)


def test_gemv_m1_takes_the_split_bundle_when_split_ran(tmp_path):
    ctx = run_all.Context(False, tmp_path, tmp_path, None)
    assert run_all.BY_NAME["gemv_m1"].args(ctx) == ["--out", str(tmp_path / "gemv_m1.json")]
    bundle = tmp_path / "split" / "bundle"
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    assert run_all.BY_NAME["gemv_m1"].args(ctx)[-2:] == ["--bundle", str(bundle)]
    # split runs first, so its bundle exists by the time gemv_m1's arguments are built
    names = [b.name for b in run_all.BENCHMARKS]
    assert names.index("split") < names.index("gemv_m1")


def test_paired_ratio_is_per_round_median():
    # the serve segments are real: recompute ugsep/eager with the triton helper, same numbers
    raw = _raw("serve")
    ours = run_all.paired(raw["segments"], "ugsep", "eager")
    for conc, r in ours.items():
        expected = raw["paired_ratios"]["ugsep"][conc]["candidates_per_s_ratio"]
        assert r["candidates_per_s_ratio"] == pytest.approx(expected)


def test_markdown_and_files_written(tmp_path):
    for name in COMMITTED:
        shutil.copy(RESULTS / run_all.BY_NAME[name].result, tmp_path)
    run_all.write_summary(tmp_path, status={"serve": "FAILED (exit 1)"})
    md = (tmp_path / "SUMMARY.md").read_text()
    payload = json.loads((tmp_path / "summary.json").read_text())
    assert set(payload["summary"]) == set(run_all.BY_NAME)
    assert payload["summary"]["triton"]["missing"] and "No `bench_triton.json` here." in md
    assert "**FAILED (exit 1)**" in md
    s = payload["summary"]["split"]["summary"]["per_n"]["512"]
    assert f"| 512 | {s['speedup']:.2f}x | {s['ceiling']:.2f}x |" in md


@pytest.mark.parametrize(
    ("name", "drop"),
    [
        ("split", ("results",)),
        ("quant", ("latency", "N=512")),
        ("serve", ("paired_ratios",)),
        ("moe", ("configs",)),
        ("gemv_m1", ("per_token",)),
    ],
)
def test_schema_change_is_a_clear_error(tmp_path, name, drop):
    b = run_all.BY_NAME[name]
    data = _raw(name)
    node = data
    for key in drop[:-1]:
        node = node[key]
    del node[drop[-1]]
    (tmp_path / b.result).write_text(json.dumps(data))
    with pytest.raises(
        run_all.SummaryError, match=rf"{b.result}.*{drop[-1]}.*benchmarks/{b.script}"
    ):
        run_all.collect(tmp_path, [name])


def test_summary_only_cli(tmp_path, capsys):
    shutil.copy(RESULTS / "bench_split.json", tmp_path)
    assert run_all.main(["--summary-only", "--out", str(tmp_path)]) == 0
    assert "| 2048 |" in (tmp_path / "SUMMARY.md").read_text()
    assert run_all.main(["--summary-only", "--out", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_committed_summary_is_up_to_date():
    committed = (RESULTS / "SUMMARY.md").read_text()
    assert committed == run_all.to_markdown(run_all.collect(RESULTS)), (
        "benchmarks/results/SUMMARY.md is stale: run "
        "`.venv/bin/python benchmarks/run_all.py --summary-only`"
    )
