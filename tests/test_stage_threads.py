"""Intra-op threads per small-batch stage (exporter.steps.threads) and the CPU backend's cap:
real graphs, real ONNX Runtime sessions and timings; the tests check the decision against
what was measured, never a timing threshold."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from exporter.pipeline import ExportContext, ExportOptions
from exporter.steps.quantize import QuantizeOptions, quantize_bundle_stages
from exporter.steps.threads import (
    DEFAULT,
    ThreadsOptions,
    choose_stage_threads,
    pick,
    step_stage_threads,
    thread_options,
)
from runtime.backends.ort import OrtBackend
from runtime.bundle import Bundle
from runtime.errors import BundleError
from runtime.manifest import Manifest
from runtime.scorer import Scorer
from tests.test_quant_tune import _chain, _expected_max_rows


def test_thread_options_are_the_serving_count_then_smaller_powers_of_two():
    assert thread_options(2) == [2, 1]
    assert thread_options(8) == [8, 4, 2, 1]
    assert thread_options(6) == [6, 4, 2, 1]
    assert thread_options(1) == [1]
    assert thread_options(None, cpus=4) == [None, 2, 1]  # ORT's default first
    assert thread_options(None, cpus=1) == [None]


def test_pick_is_the_fastest_and_a_tie_keeps_the_serving_threads():
    assert pick({2: 1.0, 1: 0.8}) == 1
    assert pick({2: 0.8, 1: 1.0}) == 2
    assert pick({4: 1.0, 2: 0.7, 1: 0.9}) == 2
    assert pick({2: 1.0, 1: 1.0}) == 2
    assert pick({None: 1.0, 1: 1.0}) is None


def _label(t):
    return DEFAULT if t is None else str(t)


def _stages():
    group = _chain([64, 1024, 1024, 64], batch="N")
    small = quantize_bundle_stages(
        {"full": group}, None, options=QuantizeOptions(min_elements=0, per_token_stages=())
    )[0]["full"]
    return {"user": _chain([64, 512, 512]), "group": group, "group_small": small}


def _check_record(chosen, rows, rec, serve, given_rows):
    for stage, entry in rec["stages"].items():
        medians = {(None if k == DEFAULT else int(k)): v for k, v in entry["median_ms"].items()}
        assert list(medians) == thread_options(serve)  # every option timed, serving one first
        fastest = pick(medians)
        if stage == "group_small" and fastest != serve and "crossover" in entry:
            # fewer threads: timed again against the group graph at growing N
            assert entry["max_rows"] == _expected_max_rows(entry["crossover"])
            if not entry["max_rows"]:
                assert "keeps the serving threads" in entry["why"] and stage not in chosen
                assert rows == given_rows
                continue
            assert rows == entry["max_rows"]
        assert entry["chosen"] == _label(fastest)
        assert chosen.get(stage) == (fastest if fastest != serve else None)
    if "group_small" not in chosen:
        assert rows == given_rows


def test_each_small_batch_stage_gets_the_thread_count_that_ran_fastest():
    stages = _stages()
    chosen, rows, rec = choose_stage_threads(stages, 2, group_small_rows=64)
    assert set(rec["stages"]) == {"user", "group_small"}  # group serves large calls: not timed
    assert rec["serve_threads"] == "2" and rec["cpu"]
    _check_record(chosen, rows, rec, 2, 64)
    # the user fixed group_small's bound (--quant-small-batch K): never re-timed
    chosen_f, rows_f, rec_f = choose_stage_threads(
        stages, 2, group_small_rows=8, forced_small_rows=True
    )
    assert rows_f == 8 and "crossover" not in rec_f["stages"]["group_small"]
    # served on one thread: nothing to choose, nothing timed
    assert choose_stage_threads(stages, 1, group_small_rows=64) == (
        {}, 64, {"cpu": rec["cpu"], "serve_threads": "1", "stages": {},
                 "why": "served with 1 thread: nothing to choose"},
    )


def test_the_pipeline_step_writes_the_choice_into_the_stage_entries(tmp_path):
    stages = _stages()

    def ctx_for(**options):
        ctx = ExportContext(loaded=None, out_dir=tmp_path, options=ExportOptions(**options))
        ctx.stages = dict(stages)
        ctx.stage_meta = {"group_small": {"max_rows": 64}}
        return ctx

    ctx = ctx_for(serve_threads=2)
    step_stage_threads(ctx)
    rec = ctx.manifest_fields["optimize"].stage_threads
    for stage, entry in rec.stages.items():
        want = None if entry.chosen == "2" else int(entry.chosen)
        assert ctx.stage_meta.get(stage, {}).get("intra_op_threads") == want
    small = rec.stages["group_small"].max_rows
    assert ctx.stage_meta["group_small"]["max_rows"] == (64 if small is None else small)
    for options in ({"target": "trt", "serve_threads": 2},
                    {"threads": ThreadsOptions(enabled=False), "serve_threads": 2}):
        ctx = ctx_for(**options)
        step_stage_threads(ctx)
        assert "optimize" not in ctx.manifest_fields
        assert ctx.stage_meta == {"group_small": {"max_rows": 64}}


def _with_manifest(bundle_dir, tmp_path, **stage_keys):
    dst = tmp_path / "b"
    shutil.copytree(bundle_dir, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["stages"]["full"].update(stage_keys)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_the_cpu_backend_caps_a_stage_at_its_intra_op_threads(toy_bundle, tmp_path):
    capped = Bundle.open(_with_manifest(toy_bundle, tmp_path, intra_op_threads=1))
    assert capped.manifest.stage_threads("full") == 1
    assert Bundle.open(toy_bundle).manifest.stage_threads("full") is None

    def threads(backend, bundle):
        return backend.open(bundle, "full")._sess.get_session_options().intra_op_num_threads

    assert threads(OrtBackend(intra_op_threads=2), capped) == 1
    assert threads(OrtBackend(), capped) == 1  # ORT's default, capped
    assert threads(OrtBackend(intra_op_threads=2, stage_threads=False), capped) == 2
    assert threads(OrtBackend(intra_op_threads=2), Bundle.open(toy_bundle)) == 2
    # the same scores on either thread count
    a = Scorer(capped, OrtBackend(intra_op_threads=2))
    b = Scorer(capped, OrtBackend(intra_op_threads=2, stage_threads=False))
    rng = np.random.default_rng(0)
    user = {"user_ids": np.array([3, 7]), "user_dense": rng.standard_normal(3).astype(np.float32)}
    cands = {
        "item_ids": rng.integers(0, 40, (5, 2)),
        "item_dense": rng.standard_normal((5, 1)).astype(np.float32),
    }
    np.testing.assert_array_equal(a.score(user, cands)["ctr"], b.score(user, cands)["ctr"])


@pytest.mark.parametrize("bad", [0, -1, "2", True, 1.5])
def test_a_malformed_intra_op_threads_is_refused(toy_bundle, tmp_path, bad):
    d = json.loads((_with_manifest(toy_bundle, tmp_path, intra_op_threads=bad) / "manifest.json").read_text())
    with pytest.raises(BundleError, match="intra_op_threads"):
        Manifest.from_dict(d)


def test_inspect_prints_the_timed_threads_and_the_re_timed_crossover(toy_bundle, tmp_path, capsys):
    from exporter.cli import main

    rec = {
        "cpu": "x",
        "serve_threads": "2",
        "stages": {
            "full": {"batch": 1, "median_ms": {"2": 0.5, "1": 0.25}, "chosen": "1"},
            "group_small": {
                "batch": 1,
                "median_ms": {"2": 0.4, "1": 0.3},
                "chosen": "1",
                "crossover": [
                    {"candidates": 1, "small_ms": 0.3, "large_ms": 0.5, "ratio": 0.6},
                    {"candidates": 2, "small_ms": 0.6, "large_ms": 0.5, "ratio": 1.2},
                ],
                "max_rows": 1,
            },
        },
    }
    d = _with_manifest(toy_bundle, tmp_path, intra_op_threads=1)
    m = json.loads((d / "manifest.json").read_text())
    m["optimize"] = {**(m.get("optimize") or {}), "stage_threads": rec}
    (d / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["inspect", str(d)]) == 0
    shown = " ".join(capsys.readouterr().err.split())
    assert "threads, timed against the serving 2: full runs on 1 thread(s) (2: 0.500 ms, 1: 0.250 ms" in shown
    assert "group_small runs on the serving threads" in shown  # no cap in this manifest
    assert "re-timed against group: N=1 0.60×, N=2 1.20× -> serves up to 1 candidates" in shown
