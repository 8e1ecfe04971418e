"""Third-party CTR models through the CLI, as a user runs them: ``ugsep export`` of a ``.pt2``
archive (or of a trusted factory checkpoint) with a spec file and ``--data``, then ``ugsep
check``, ``ugsep inspect`` and one request each through ``ugsep serve`` on 127.0.0.1.

deepctr-torch models read one float tensor whose columns mix user and item fields (the
column-layout spec); FuxiCTR models are built from its layers over a dict of per-field
tensors. Models are briefly trained on synthetic rows here; exports are shared per module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch

from exporter.cli import main
from tests.serving.http_utils import json_body
from tests.serving.test_sigterm import _free_port, _wait_ready

pytest.importorskip("deepctr_torch")
pytest.importorskip("fuxictr")
tp = pytest.importorskip("tests.third_party")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PT2_MODELS = ("DeepFM", "DCN", "xDeepFM", "FuxiDeepFM", "FuxiDCNv2")  # AutoInt, NFM: the bench
FACTORY_MODEL = "WDL"  # exported from a checkpoint naming the registered factory
MODELS = (*PT2_MODELS, FACTORY_MODEL)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("third_party")
    rows = tp.synthetic(30, 20, seed=0)
    np.savez(d / "data.npz", **rows)
    np.savez(d / "data_dict.npz", **tp.as_dict_rows(rows))
    models = {}
    for name in MODELS:
        models[name] = tp.train_briefly(tp.build(name), name, rows)
        spec = tp.deepctr_spec(name) if name in tp.DEEPCTR_MODELS else tp.fuxictr_spec(name)
        (d / f"{name}.spec.json").write_text(json.dumps(spec))
    return d, rows, models


def _data(d: Path, name: str) -> str:
    return str(d / ("data.npz" if name in tp.DEEPCTR_MODELS else "data_dict.npz"))


def _checkpoint(d: Path, model: torch.nn.Module) -> Path:
    from safetensors.torch import save_file

    ckpt = d / "wdl_ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    cfg = {"factory": "tests.third_party:deepctr_model", "kwargs": {"name": FACTORY_MODEL}}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "spec.json").write_text((d / f"{FACTORY_MODEL}.spec.json").read_text())
    return ckpt


@pytest.fixture(scope="module")
def bundles(work):
    d, _rows, models = work
    out = {}
    for name in MODELS:
        b = d / f"bundle_{name}"
        if name == FACTORY_MODEL:
            argv = ["export", str(_checkpoint(d, models[name])), "--trust-module", "tests"]
        else:
            tp.save_pt2(models[name], name, _rows, d / f"{name}.pt2")
            argv = ["export", str(d / f"{name}.pt2"), "--spec", str(d / f"{name}.spec.json")]
        assert main([*argv, "--data", _data(d, name), "--out", str(b), "--no-stage-threads"]) == 0, name
        out[name] = b
    return out


@pytest.mark.parametrize("name", MODELS)
def test_export_splits_with_parity_and_boundaries_the_group_reads(bundles, name):
    m = json.loads((bundles[name] / "manifest.json").read_text())
    assert m["split"] is not None, name
    assert m["parity"]["passed"]
    names = [b["name"] for b in m["split"]["boundary"]]
    group_in = [i.name for i in onnx.load(bundles[name] / "group.onnx").graph.input]
    assert names and set(names) <= set(group_in)
    user_out = [o.name for o in onnx.load(bundles[name] / "user.onnx").graph.output]
    assert names == user_out


@pytest.mark.parametrize("name", [n for n in MODELS if n in tp.DEEPCTR_MODELS])
def test_mixed_layer_rewrite_moves_flops_to_the_user_side(bundles, name):
    report = json.loads((bundles[name] / "split_report.json").read_text())["report"]
    assert report["mixed_layers"]["user_per_row_before"] == 0  # lookups only, before
    assert report["flops"]["user_per_row"] > 0 and report["mixed_layers"]["rewritten"]


@pytest.mark.parametrize("name", MODELS)
def test_check_and_inspect_through_the_cli(work, bundles, name, capsys):
    d = work[0]
    trust = ["--trust-module", "tests"] if name == FACTORY_MODEL else []
    assert main(["check", str(bundles[name]), "--data", _data(d, name), *trust]) == 0
    capsys.readouterr()
    assert main(["inspect", str(bundles[name])]) == 0
    err = capsys.readouterr().err
    assert "boundary tensors" in err and "split ceiling" in err


def _request(name: str, rows, n: int = 7):
    """Request 0: its user's columns, its first n candidates, in the model's layout."""
    first = {k: v[:n] for k, v in rows.items()}
    if name in tp.DEEPCTR_MODELS:
        return {}, {"X": first["X"]}, first
    d = tp.as_dict_rows(first)
    spec = tp.fuxictr_spec(name)
    user = {s["name"]: d[s["name"]][:1] for s in spec["inputs"] if s["side"] == "user"}
    cands = {s["name"]: d[s["name"]] for s in spec["inputs"] if s["side"] == "group"}
    return user, cands, first


def test_one_request_each_through_ugsep_serve(work, bundles):
    _d, rows, models = work
    port = _free_port()
    cmd = [sys.executable, "-m", "exporter.cli", "serve", *map(str, bundles.values()),
           "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, timeout_s=180)
        for name in MODELS:
            user, cands, first = _request(name, rows)
            r = httpx.post(f"{url}/v2/models/{name.lower()}/infer", json=json_body(user, cands), timeout=60)
            assert r.status_code == 200, (name, r.text)
            with torch.no_grad():
                ref = models[name](**tp.torch_inputs(name, first)).reshape(-1).numpy()
            got = np.array(r.json()["outputs"][0]["data"], np.float32)
            assert np.abs(got - ref).max() <= 1e-5, name
        bad = rows["X"][:3].copy()
        bad[1, 3] = 60.0  # item_id's vocabulary is [0, 60)
        r = httpx.post(f"{url}/v2/models/deepfm/infer", json=json_body({}, {"X": bad}), timeout=60)
        assert r.status_code == 400 and "column 3 ('item_id')" in r.text and "60" in r.text
        bad[1, 3] = 2.5
        r = httpx.post(f"{url}/v2/models/deepfm/infer", json=json_body({}, {"X": bad}), timeout=60)
        assert r.status_code == 400 and "non-integer id" in r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
