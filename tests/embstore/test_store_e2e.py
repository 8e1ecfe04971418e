"""The embedding store end to end: CLI export, the store file, scoring, parity, int8, errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from safetensors.numpy import load_file

import runtime
from exporter.cli import main
from exporter.steps.capture import to_torch_inputs
from runtime.embstore import MmapStore
from runtime.errors import BundleError, RequestError
from runtime.manifest.sections import StoreTable
from runtime.sample import sample_requests
from runtime.serving import ServerThread, build_app
from runtime.spec import FeatureSpec
from students.data import save_npz
from tests.embstore.models import V, make_toy_lookups, toy_spec, write_checkpoint
from tests.serving.http_utils import triton_scores

pytestmark = pytest.mark.slow
SPEC = FeatureSpec.from_dict(toy_spec())
TRUST = ["--trust-module", "tests"]
CUT = {"user_emb.weight", "seq_mean.weight", "seq_max.weight", "item_w", "cat_w", "tags.weight"}


@pytest.fixture(scope="module")
def model():
    return make_toy_lookups()


@pytest.fixture(scope="module")
def data(tmp_path_factory, model):
    """12 held-out requests of 100 candidates, labels drawn from the eager model's ctr."""
    rows, rid = sample_requests(SPEC, 12, 100, seed=11)
    with torch.no_grad():
        p = model(**to_torch_inputs(SPEC, rows)).numpy()
    label = (np.random.default_rng(1).random(len(p)) < p).astype(np.int64)
    return save_npz(tmp_path_factory.mktemp("emb_data") / "held.npz", {**rows, "label": label, "request_id": rid})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    return write_checkpoint(tmp_path_factory.mktemp("emb_ckpt") / "toy", model, toy_spec())


def _export(tmp, ckpt, data, name, *flags) -> str:
    out = tmp / name
    code = main(["export", str(ckpt), "--out", str(out), "--data", str(data), "--store-min-bytes", "4096", *TRUST, *flags])
    assert code == 0
    return str(out)


@pytest.fixture(scope="module")
def store_bundle(tmp_path_factory, ckpt, data):
    return _export(tmp_path_factory.mktemp("emb_b"), ckpt, data, "store")


@pytest.fixture(scope="module")
def graph_bundle(tmp_path_factory, ckpt, data):
    return _export(tmp_path_factory.mktemp("emb_b"), ckpt, data, "graph", "--no-split", "--no-parity",
                   "--store-min-bytes", str(1 << 40))


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, ckpt, data):
    # row-wise int8 tables composed with W8A16 dense weights
    return _export(tmp_path_factory.mktemp("emb_b"), ckpt, data, "int8", "--no-split", "--embeddings", "int8",
                   "--precision", "w8a16")


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory, ckpt, data):
    return _export(tmp_path_factory.mktemp("emb_b"), ckpt, data, "fp16", "--embeddings", "fp16")


def _requests(n_req=4, n=60, seed=5):
    rows, rid = sample_requests(SPEC, n_req, n, seed=seed)
    out = []
    for r in range(n_req):
        idx = rid == r
        out.append(({s.name: rows[s.name][idx][:1] for s in SPEC.user_inputs},
                    {s.name: rows[s.name][idx] for s in SPEC.group_inputs}))
    return rows, out


def test_manifest_and_store_file(store_bundle, model):
    m = json.loads(open(f"{store_bundle}/manifest.json").read())
    emb = m["embeddings"]
    assert {t["name"] for t in emb["tables"]} == CUT
    assert [t["name"] for t in emb["in_graph"]] == ["city.weight"]  # 160 bytes < 4096
    sides = {(lk["input"], lk["side"]) for lk in emb["lookups"]}
    assert sides == {("user_ids", "user"), ("user_seq", "user"), ("item_ids", "group"),
                     ("item_cat", "group"), ("item_tags", "group")}
    # read back with safetensors' own reader: the tables are the model's weights, bit for bit
    tensors = load_file(f"{store_bundle}/{emb['file']}")
    sd = model.state_dict()
    for t in emb["tables"]:
        w = sd[t["name"]].numpy()
        assert np.array_equal(tensors[t["name"]], w)
        assert t["sha256"] == hashlib.sha256(w.tobytes()).hexdigest()
        assert (t["rows"], t["dim"]) == w.shape
    assert emb["file"] in m["files"]  # the bundle's sha256 verification covers the store
    for stage in ("user", "group"):  # the split stages read gathered rows, no ids
        assert not {"user_ids", "user_seq", "item_ids", "item_cat", "item_tags"} & set(m["stages"][stage]["inputs"])
    assert "emb0__user_ids" in m["stages"]["user"]["inputs"]
    assert not any(i.startswith("emb") for i in m["stages"]["user"]["inputs"] if "item" in i)


def test_store_path_equals_in_graph_path_and_eager(store_bundle, graph_bundle, model):
    split = runtime.load(store_bundle, "onnxruntime")
    full = runtime.load(store_bundle, "onnxruntime", use_split=False)
    graph = runtime.load(graph_bundle, "onnxruntime", allow_unverified=True)
    assert split.split and graph.store is None and split.store is not None
    rows, reqs = _requests()
    got = {k: np.concatenate([s.score(u, c)["ctr"] for u, c in reqs]) for k, s in
           [("split", split), ("full", full), ("graph", graph)]}
    with torch.no_grad():
        eager = model(**to_torch_inputs(SPEC, rows)).numpy()
    # bags reduce in a different op order than ONNX's in-graph embedding_bag: 1 ulp-level
    assert np.abs(got["full"] - got["graph"]).max() < 1e-6
    assert np.abs(got["split"] - eager).max() < 1e-6
    assert np.abs(got["full"] - eager).max() < 1e-6
    batched = np.concatenate([o["ctr"] for o in split.score_many(reqs)])
    assert np.abs(batched - got["split"]).max() < 1e-6
    parity = json.loads(open(f"{store_bundle}/parity.json").read())
    assert parity["passed"] and parity["rows"]["n"] == 1200


def test_user_ids_are_looked_up_once_per_request(store_bundle):
    scorer = runtime.load(store_bundle, "onnxruntime")
    calls = []
    store = scorer.store.store

    class Counting:  # the EmbeddingStore protocol: a second tier could stand here
        def lookup(self, table, ids, out=None):
            calls.append((table, ids.shape))
            return store.lookup(table, ids, out)

        rows, dim, dtype = store.rows, store.dim, store.dtype

    assert isinstance(Counting(), runtime.embstore.EmbeddingStore)
    scorer.store.store = Counting()
    _, reqs = _requests(n_req=1, n=37)
    scorer.score(*reqs[0])
    by_table = {t: s for t, s in calls}
    assert by_table["user_emb.weight"] == (1, 3)  # one user row
    assert by_table["item_w"] == (37, 2)  # every candidate
    assert len(calls) == 6


def test_ids_outside_a_table_are_the_requests_error(store_bundle):
    scorer = runtime.load(store_bundle, "onnxruntime")
    _, reqs = _requests(n_req=1, n=5)
    user, cands = reqs[0]
    bad = {**cands, "item_cat": np.array([[1], [2], [V + 7], [3], [4]], dtype=np.int64)}
    with pytest.raises(RequestError, match=rf"input 'item_cat' has id {V + 7} outside embedding table 'cat_w'"):
        scorer.score(user, bad)
    neg = {**cands, "item_cat": -cands["item_cat"] - 1}
    with pytest.raises(RequestError, match="input 'item_cat' has id -"):
        scorer.score(user, neg)
    with ServerThread(build_app([store_bundle])) as srv:  # over HTTP: a 400, then still serving
        client = triton.InferenceServerClient(f"127.0.0.1:{srv.port}")
        with pytest.raises(triton.InferenceServerException, match="item_cat"):
            triton_scores(client, SPEC.name, user, bad, binary=True)
        got = triton_scores(client, SPEC.name, user, cands, binary=True)
    assert np.abs(got - scorer.score(user, cands)["ctr"]).max() < 1e-6


def test_int8_tables_with_w8a16_within_ranking_budget(int8_bundle, store_bundle):
    m = json.loads(open(f"{int8_bundle}/manifest.json").read())
    emb = m["embeddings"]
    assert emb["dtype"] == "int8" and all(t["dtype"] == "int8_rowwise" for t in emb["tables"])
    for t in emb["tables"]:
        assert t["bytes"] == t["rows"] * (t["dim"] + 8)  # uint8 codes + fp32 scale and bias
    parity = json.loads(open(f"{int8_bundle}/parity.json").read())
    assert parity["passed"]
    stage = next(s for s in parity["stages"] if s["name"].startswith("onnx-full"))
    assert stage["name"] == "onnx-full-w8a16-emb-int8"
    metrics = stage["outputs"]["ctr"]
    # |ΔAUC| budget 1e-4, judged with its interval (docs/parity.md): the 95 % interval must
    # not lie outside the budget (the point estimate alone is within noise of it)
    d, se = metrics["delta_auc"], metrics["delta_auc_ci"]["se"]
    assert abs(d) - 1.96 * se <= 1e-4 and metrics["top10_overlap"]["mean"] >= 0.95
    assert 0 < metrics["max_abs"] < 0.05  # quantized, not exact


def test_fp16_tables_half_the_bytes_within_the_fp16_budget(fp16_bundle, store_bundle, model):
    m = json.loads(open(f"{fp16_bundle}/manifest.json").read())
    emb = m["embeddings"]
    fp32 = {t["name"]: t for t in json.loads(open(f"{store_bundle}/manifest.json").read())["embeddings"]["tables"]}
    assert emb["dtype"] == "fp16" and {t["name"] for t in emb["tables"]} == CUT
    tensors = load_file(f"{fp16_bundle}/{emb['file']}")
    sd = model.state_dict()
    for t in emb["tables"]:
        assert t["dtype"] == "float16" and t["bytes"] == t["rows"] * t["dim"] * 2
        assert 2 * t["bytes"] == fp32[t["name"]]["bytes"]  # half of the fp32 store
        assert np.array_equal(tensors[t["name"]], sd[t["name"]].numpy().astype(np.float16))
    parity = json.loads(open(f"{fp16_bundle}/parity.json").read())
    assert parity["passed"]
    names = {s["name"] for s in parity["stages"] if s["status"] != "skipped"}
    assert {"onnx-full-emb-fp16", "onnx-split-emb-fp16"} <= names  # judged by the fp16 budget
    # served: vs eager within fp16's budget, and == eager with its tables rounded to fp16
    split = runtime.load(fp16_bundle, "onnxruntime")
    full = runtime.load(fp16_bundle, "onnxruntime", use_split=False)
    rows, reqs = _requests(seed=9)
    rounded = make_toy_lookups()
    with torch.no_grad():
        for name in CUT:
            t = rounded.get_parameter(name)
            t.copy_(t.half().float())
        eager = model(**to_torch_inputs(SPEC, rows)).numpy()
        eager16 = rounded(**to_torch_inputs(SPEC, rows)).numpy()
    for scorer in (split, full):
        got = np.concatenate([scorer.score(u, c)["ctr"] for u, c in reqs])
        assert 0 < np.abs(got - eager).max() < 1e-3
        assert np.abs(got - eager16).max() < 1e-6


def test_cli_errors_are_one_line_exit_2(store_bundle, tmp_path, capsys):
    b = shutil.copytree(store_bundle, tmp_path / "b")
    store = b / "embeddings.safetensors"
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 2])  # truncated
    assert main(["inspect", str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert "embeddings.safetensors" in err and "Traceback" not in err and len(err.splitlines()) == 1
    tables = json.loads((b / "manifest.json").read_text())["embeddings"]["tables"]
    with pytest.raises(BundleError, match="truncated"):  # read without the sha256 check too
        MmapStore(store, [StoreTable.from_dict(t, "manifest", "table") for t in tables])
    store.unlink()  # missing
    assert main(["inspect", str(b)]) == 2
    assert "embeddings.safetensors' is missing" in capsys.readouterr().err


def test_store_rows_disagreeing_with_the_spec_are_refused(store_bundle, tmp_path):
    b = shutil.copytree(store_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    for s in m["spec"]["inputs"]:
        if s["name"] == "item_ids":
            s["vocab"] = V + 1  # one more id than the table has rows
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"table 'item_w' has 300 rows but input 'item_ids' \(vocab 301\)"):
        runtime.load(b, "onnxruntime")


def test_store_path_is_bit_exact_to_the_in_graph_path(tmp_path, model):
    """Without bags (whose reductions ONNX orders differently) the store path changes nothing:
    max abs difference 0 against the same model with its tables in the graph. The in-graph
    bundle is written with ONNX external data (a 1 KiB limit stands in for protobuf's 2 GiB):
    full.onnx.data, relative to the bundle, checked on the file, sha256-verified."""
    from exporter import ExportOptions, LoadedModel, export_bundle
    from exporter.steps.embeddings import EmbeddingsOptions
    from exporter.steps.write import WriteOptions

    nobag = make_toy_lookups(bags=False)
    outs = {}
    for name, min_bytes in (("store", 4096), ("graph", 1 << 40)):
        export_bundle(LoadedModel(spec=SPEC, module=nobag), tmp_path / name, ExportOptions(
            split=False, parity=False, embeddings=EmbeddingsOptions(min_bytes=min_bytes),
            write=WriteOptions(external_data_bytes=1024)))
        scorer = runtime.load(tmp_path / name, "onnxruntime", allow_unverified=True)
        assert (scorer.store is None) == (name == "graph")
        rows, reqs = _requests(n_req=3, n=50, seed=8)
        outs[name] = np.concatenate([scorer.score(u, c)["ctr"] for u, c in reqs])
    assert np.abs(outs["store"] - outs["graph"]).max() == 0.0
    with torch.no_grad():
        eager = nobag(**to_torch_inputs(SPEC, rows)).numpy()
    assert np.abs(outs["store"] - eager).max() < 1e-6
    _check_external_data(tmp_path / "graph")


def _check_external_data(out) -> None:
    import onnx

    assert "full.onnx.data" in runtime.Bundle.open(out).manifest.files  # sha256-verified
    onnx.checker.check_model(str(out / "full.onnx"))
    graph = onnx.load(str(out / "full.onnx"), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(
        {e.key: e.value for e in t.external_data}["location"] == "full.onnx.data" for t in external
    )  # relative to the bundle: the bundle can move
    assert (out / "full.onnx").stat().st_size < 64 * 1024 < (out / "full.onnx.data").stat().st_size
    data = out / "full.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="full.onnx.data"):
        runtime.Bundle.open(out)
