"""Request scope: models whose candidate side mixes rows are proven so, and never merged.

Two models written here from scratch, independently of the students: a listwise ranker
(softmax over the request's candidates) and one that standardises item features by
batch statistics. Both export (split), are detected as request-scoped, and when served
over real HTTP to concurrent clients every request gets the eager model's scores for
that request alone. A row-wise model still has its requests merged.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import numpy as np
import pytest
import torch
from torch import nn

import runtime
from exporter.load import LoadedModel
from exporter.steps.capture import capture
from exporter.trust import model_factory
from graph_passes.fx.row_scope import RowScopeAnalysis, row_scope
from runtime.serving import ServerThread, build_app
from runtime.spec import FeatureSpec
from tests.serving.http_utils import json_body

SPEC = {
    "inputs": [
        {"name": "u_ids", "side": "user", "dtype": "int64", "shape": [2], "vocab": 30},
        {"name": "u_x", "side": "user", "dtype": "float32", "shape": [4]},
        {"name": "i_ids", "side": "group", "dtype": "int64", "shape": [1], "vocab": 20},
        {"name": "i_x", "side": "group", "dtype": "float32", "shape": [3]},
    ],
    "outputs": ["score"],
}


def spec_named(name: str) -> FeatureSpec:
    return FeatureSpec.from_dict({"name": name, **SPEC})


class _Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.u_emb, self.i_emb = nn.Embedding(30, 6), nn.Embedding(20, 6)
        self.user = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
        self.item = nn.Linear(9, 8)

    def towers(self, u_ids, u_x, i_ids, i_x):
        u = self.user(torch.cat([self.u_emb(u_ids).flatten(1), u_x], 1))
        return u, self.item(torch.cat([self.i_emb(i_ids).flatten(1), i_x], 1))


class Listwise(_Towers):
    """Listwise: a probability distribution over the request's candidates."""

    def forward(self, u_ids, u_x, i_ids, i_x):
        u, i = self.towers(u_ids, u_x, i_ids, i_x)
        return torch.softmax((u * i).sum(-1), dim=0)


class BatchStat(_Towers):
    """Item features standardised by the statistics of the candidates scored together."""

    def forward(self, u_ids, u_x, i_ids, i_x):
        i_x = (i_x - i_x.mean(0, keepdim=True)) / (i_x.std(0, keepdim=True, unbiased=False) + 0.1)
        u, i = self.towers(u_ids, u_x, i_ids, i_x)
        return torch.sigmoid((u * i).sum(-1))


class Pointwise(_Towers):
    """Row-wise: a dot product of the towers (a broadcast constant bias is not mixing)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.full((1, 8), 0.1))

    def forward(self, u_ids, u_x, i_ids, i_x):
        u, i = self.towers(u_ids, u_x, i_ids, i_x)
        i = i + self.bias.expand(i.shape[0], 8)
        return torch.sigmoid((u * i).sum(-1))


class Positional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(7, 1)

    def forward(self, u_ids, u_x, i_ids, i_x):
        pos = torch.arange(u_x.shape[0], dtype=torch.float32)[:, None]
        return (self.lin(torch.cat([u_x, i_x], 1)) + pos).squeeze(-1)


def make(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


@pytest.mark.parametrize(
    "cls, op, line",
    [
        (Listwise, "softmax", "torch.softmax((u * i).sum(-1), dim=0)"),
        (BatchStat, "mean", "i_x.mean(0, keepdim=True)"),
        (Positional, "arange", "torch.arange(u_x.shape[0]"),
    ],
)
def test_mixing_nodes_are_found_with_their_source_line(cls, op, line):
    ep = capture(make(cls), spec_named("t"))
    facts = RowScopeAnalysis().call(ep).facts
    assert facts["rowwise"] is False
    first = facts["mixing"][0]
    assert op in first["op"] and line in first["source"] and "test_row_scope.py" in first["source"]


def test_rowwise_model_is_proven_rowwise_on_every_side():
    ep = capture(make(Pointwise), spec_named("t"))
    assert row_scope(ep, split=True) == {"full": "rows", "user": "rows", "group": "rows", "mixing": []}


def request(seed: int, n: int, user_seed: int | None = None) -> tuple[dict, dict]:
    ru = np.random.default_rng(500 + (seed if user_seed is None else user_seed))
    rc = np.random.default_rng(seed)
    user = {"u_ids": ru.integers(1, 30, (1, 2)), "u_x": ru.standard_normal((1, 4)).astype(np.float32)}
    cands = {"i_ids": rc.integers(1, 20, (n, 1)), "i_x": rc.standard_normal((n, 3)).astype(np.float32)}
    return user, cands


def eager_request(model: nn.Module, user: dict, cands: dict) -> np.ndarray:
    """The eager model on this request's rows alone (its user repeated per candidate)."""
    n = len(next(iter(cands.values())))
    with torch.no_grad():
        rows = {k: torch.from_numpy(np.repeat(v, n, 0)) for k, v in user.items()}
        return model(**rows, **{k: torch.from_numpy(v) for k, v in cands.items()}).numpy()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from exporter import ExportOptions, export_bundle

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("row_scope")
    out = {}
    for name, cls in (("listwise", Listwise), ("batchstat", BatchStat), ("pointwise", Pointwise)):
        loaded = LoadedModel(spec_named(name), module=make(cls))
        ctx = export_bundle(loaded, root / name, ExportOptions(max_candidates=128, parity_rows=300))
        assert ctx.parity_report.passed, ctx.parity_report.failed_stages
        out[name] = (root / name, loaded.module)
    return out


def test_manifest_and_inspect_say_request_scoped(bundles, capsys):
    from exporter.commands.inspect import inspect_bundle

    for name, scoped in (("listwise", True), ("batchstat", True), ("pointwise", False)):
        path, _ = bundles[name]
        m = json.loads((path / "manifest.json").read_text())
        assert m["split"] is not None, f"{name} has a user tower: it must split"
        assert m["row_scope"]["group"] == ("request" if scoped else "rows")
        assert m["row_scope"]["user"] == "rows"
        inspect_bundle(path)
        text = capsys.readouterr().err
        assert ("request-scoped" in text) is scoped, text


@pytest.mark.parametrize("name", ["listwise", "batchstat"])
def test_score_many_equals_eager_per_request(bundles, name):
    path, model = bundles[name]
    for use_split in (True, False):
        scorer = runtime.load(path, "onnxruntime")
        if not use_split:
            scorer = runtime.Scorer(scorer.bundle, scorer.backend, use_split=False)
        reqs = [request(s, n) for s, n in ((1, 5), (2, 9), (3, 1), (4, 17))]
        got = scorer.score_many(reqs)
        for (u, c), out in zip(reqs, got, strict=True):
            np.testing.assert_allclose(out["score"], eager_request(model, u, c), rtol=1e-5, atol=1e-6)
        if use_split:
            assert scorer.stage_runs["user"] == 1 and scorer.stage_runs["group"] == len(reqs)


def _serve_concurrently(paths, reqs_by_model, **options):
    # the test is about exact scores under concurrency, not shedding: no latency budget to speak of
    with ServerThread(build_app(paths, latency_budget_ms=600_000, **options)) as srv:
        scorers = {n: srv.app.state.repo.get(n).scorer for n in reqs_by_model}
        before = {n: dict(s.stage_runs) for n, s in scorers.items()}  # load-time warm-up runs

        def call(item):
            name, (user, cands) = item
            r = httpx.post(f"{srv.url}/v2/models/{name}/infer", json=json_body(user, cands), timeout=60)
            assert r.status_code == 200, r.text
            return np.array(r.json()["outputs"][0]["data"], np.float32)

        items = [(name, req) for name, reqs in reqs_by_model.items() for req in reqs]
        with cf.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, items))
        runs = {
            n: {k: v - before[n].get(k, 0) for k, v in s.stage_runs.items()} for n, s in scorers.items()
        }
    return items, results, runs


def test_served_concurrent_requests_equal_eager_per_request(bundles):
    names = ["listwise", "batchstat", "pointwise"]
    reqs = {n: [request(100 + i, 1 + (7 * i) % 23, user_seed=i % 4) for i in range(24)] for n in names}
    items, results, runs = _serve_concurrently(
        [bundles[n][0] for n in names], reqs, max_delay_ms=30.0, cache_bytes=0
    )
    for (name, (u, c)), got in zip(items, results, strict=True):
        want = eager_request(bundles[name][1], u, c)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    for name in ("listwise", "batchstat"):  # user side batched, one group call per request
        assert runs[name]["group"] == len(reqs[name]), runs
        assert runs[name]["user"] < len(reqs[name]), runs
    # the row-wise model's requests still share group calls
    assert runs["pointwise"].get("group", 0) + runs["pointwise"].get("group_small", 0) < 24, runs


def test_parity_names_the_configuration_a_wrong_scope_breaks(bundles, tmp_path):
    """Claim the listwise bundle is row-wise: parity fails in the merged configurations."""
    import shutil

    from exporter.steps.parity import check_bundle

    path, model = bundles["listwise"]
    bad = tmp_path / "listwise"
    shutil.copytree(path, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["row_scope"] = {"full": "rows", "user": "rows", "group": "rows", "mixing": []}
    (bad / "manifest.json").write_text(json.dumps(m))
    report = check_bundle(bad, model, n_rows=300, progress=False, localise=False)
    assert not report.passed
    st = report.stage("onnx-split")
    failed = {c["name"] for c in st.configs if not c["passed"]}
    assert {"merged", "batch-1", "batch-max"} <= failed and "per-request" not in failed
    assert any("in configuration batch-max" in b for b in st.breaches["score"])


@model_factory
def make_listwise(seed: int = 0) -> nn.Module:
    """The listwise model as a registered factory (``ugsep check --factory``)."""
    return make(Listwise, seed)


def test_cli_check_names_the_failing_configuration(bundles, tmp_path, capsys):
    """``ugsep check`` on a listwise bundle whose manifest claims row-wise: exit 1, and the
    terminal names the server configurations that break (merged / batch-max), not per-request."""
    import shutil

    from safetensors.torch import save_file

    from exporter.cli import main

    path, model = bundles["listwise"]
    bad = shutil.copytree(path, tmp_path / "listwise")
    m = json.loads((bad / "manifest.json").read_text())
    m["row_scope"] = {"full": "rows", "user": "rows", "group": "rows", "mixing": []}
    (bad / "manifest.json").write_text(json.dumps(m))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    factory = "tests.test_row_scope:make_listwise"
    (ckpt / "config.json").write_text(json.dumps({"factory": factory, "kwargs": {}}))
    capsys.readouterr()
    argv = ["check", str(bad), "--checkpoint", str(ckpt), "--factory", factory]
    assert main([*argv, "--trust-module", "tests", "--rows", "300"]) == 1
    err = capsys.readouterr().err
    lines = {x.split()[0]: x for x in err.splitlines() if "fails in configuration(s)" in x}
    assert {"onnx-split", "onnx-full"} <= set(lines), err
    for line in lines.values():
        assert "batch-max" in line and "merged" in line and "per-request" not in line
