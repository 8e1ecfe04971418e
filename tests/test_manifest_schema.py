"""The typed bundle schema (runtime/manifest): every section refuses a wrong-typed or missing
field naming the file and the field path; real bundles round-trip byte for byte; unknown
format versions are refused naming the version; a registered migration chain reads older
ones; ``ugsep inspect`` on a corrupted field prints one line and exits 2.

The bad manifests are real exported bundles' manifest.json with one field changed."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

import runtime.manifest as manifest_mod
from exporter.cli import main
from runtime.errors import BundleError
from runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest
from runtime.sample import sample_requests

pytestmark = pytest.mark.slow
DELETE = object()
TRUST = ["--trust-module", "tests"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, toy_checkpoint):
    """Real bundles holding every section: a split fp32 export (timed threads, parity), a
    w8a16 export with an int8 embedding store, and the split bundle with a TensorRT entry
    as exporter.steps.tensorrt records one (no GPU needed to write the entry)."""
    from exporter.steps.capture import to_torch_inputs
    from exporter.steps.tensorrt import _engine_entry
    from exporter.steps.trt_engine import BatchRange
    from exporter.steps.write import update_bundle
    from runtime.spec import FeatureSpec
    from students.data import save_npz
    from tests.embstore.models import make_toy_lookups, toy_spec, write_checkpoint

    root = tmp_path_factory.mktemp("schema")
    out = {"split": root / "split", "store": root / "store", "trt": root / "trt"}
    assert main(["export", str(toy_checkpoint), "--out", str(out["split"]), *TRUST]) == 0

    spec, model = FeatureSpec.from_dict(toy_spec()), make_toy_lookups()
    rows, rid = sample_requests(spec, 12, 100, seed=11)
    with torch.no_grad():
        p = model(**to_torch_inputs(spec, rows)).numpy()
    label = (np.random.default_rng(1).random(len(p)) < p).astype(np.int64)
    data = save_npz(root / "held.npz", {**rows, "label": label, "request_id": rid})
    ckpt = write_checkpoint(root / "emb_ckpt" / "toy", model, toy_spec())
    assert main(["export", str(ckpt), "--out", str(out["store"]), "--data", str(data), "--no-split",
                 "--store-min-bytes", "4096", "--embeddings", "int8", "--precision", "w8a16",
                 "--quant-min-elements", "0", "--no-stage-threads", "--no-parity", *TRUST]) == 0

    shutil.copytree(out["split"], out["trt"])
    d = "engines/test-gpu-trt10.3"
    plans = {f"{d}/{s}.plan": b"not a real engine" for s in ("user", "group")}
    entry = _engine_entry(d, {"gpu": "Test GPU", "compute_capability": "8.6"}, "10.3", ["user", "group"],
                          sorted(plans), "fp16", (BatchRange(1, 8, 256), BatchRange(1, 512, 4096)))
    update_bundle(out["trt"], plans, engines=[entry])
    return out


def _raw(bundle) -> dict:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def _mutated(d: dict, path: tuple, value) -> dict:
    d = copy.deepcopy(d)
    parent = d
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        assert path[-1] in parent, path  # a field the real bundle has
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return d


def _dotted(path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


# (section, bundle, field path, wrong value, what the error says was expected)
WRONG = [
    ("stages", "split", ("stages", "group", "intra_op_threads"), "x", "expected an int >= 1, got 'x'"),
    ("split", "split", ("split", "boundary", 0, "shape"), "M", "expected a list of"),
    ("flops", "split", ("flops", "user_per_row"), "many", "expected an int or null"),
    ("files", "split", ("files", "full.onnx", "sha256"), 7, "expected a string, got 7"),
    ("parity", "split", ("parity", "passed"), "yes", "expected true or false"),
    ("source", "split", ("source", "kwargs"), [1], "expected an object or null"),
    ("limits", "split", ("limits", "max_candidates"), 0, "expected an int >= 1, got 0"),
    ("row_scope", "split", ("row_scope", "group"), "cols", "expected one of 'rows', 'request'"),
    ("optimize", "split", ("optimize", "stage_threads", "serve_threads"), 2, "expected a string, got 2"),
    ("quantization", "store", ("quantization", "weight_bytes", "full", "fp32"), "big", "expected an int >= 0"),
    ("embeddings", "store", ("embeddings", "tables", 0, "rows"), "300", "expected an int >= 0, got '300'"),
    ("engines", "trt", ("engines", 0, "dir"), None, "expected a string, got None"),
]
# (section, bundle, required field path); flops and source have no required field ({} is
# what a bundle without a split or without a recorded checkpoint holds)
MISSING = [
    ("stages", "split", ("stages", "full", "file")),
    ("split", "split", ("split", "boundary")),
    ("files", "split", ("files", "full.onnx", "sha256")),
    ("parity", "split", ("parity", "passed")),
    ("limits", "split", ("limits", "max_users_per_call")),
    ("row_scope", "split", ("row_scope", "full")),
    ("optimize", "split", ("optimize", "stage_threads", "serve_threads")),
    ("quantization", "store", ("quantization", "weight_bytes")),
    ("embeddings", "store", ("embeddings", "lookups")),
    ("engines", "trt", ("engines", 0, "dir")),
]


def test_every_section_is_covered():
    sections = set(manifest_mod._LOADERS)
    assert {s for s, *_ in WRONG} == sections
    assert {s for s, *_ in MISSING} == sections - {"flops", "source"}


@pytest.mark.parametrize(("section", "which", "path", "value", "expected"), WRONG, ids=[w[0] for w in WRONG])
def test_a_wrong_typed_field_is_refused_naming_file_and_path(bundles, section, which, path, value, expected):
    where = str(bundles[which] / MANIFEST_NAME)
    with pytest.raises(BundleError) as e:
        Manifest.from_dict(_mutated(_raw(bundles[which]), path, value), where)
    assert str(e.value).startswith(f"{where}: {_dotted(path)}: {expected}"), str(e.value)


@pytest.mark.parametrize(("section", "which", "path"), MISSING, ids=[m[0] for m in MISSING])
def test_a_missing_required_field_is_refused_naming_file_and_path(bundles, section, which, path):
    where = str(bundles[which] / MANIFEST_NAME)
    with pytest.raises(BundleError) as e:
        Manifest.from_dict(_mutated(_raw(bundles[which]), path, DELETE), where)
    assert str(e.value) == f"{where}: {_dotted(path)}: required field is missing", str(e.value)


@pytest.mark.parametrize("which", ["split", "store", "trt"])
def test_real_bundles_round_trip_exactly(bundles, which):
    text = (bundles[which] / MANIFEST_NAME).read_text()
    m = Manifest.read(bundles[which])
    assert m.to_dict() == json.loads(text)
    assert m.dumps() == text  # the bytes a signature covers


def test_sections_are_typed_after_reading(bundles):
    split, store, trt = (Manifest.read(bundles[k]) for k in ("split", "store", "trt"))
    assert split.stages["user"].file == "user.onnx" and split.split.boundary[0].name
    assert split.limits.max_candidates == 4096 and split.parity.passed is True
    assert store.embeddings.dtype == "int8" and store.embeddings.tables[0].dtype == "int8_rowwise"
    assert store.quantization.weight_bytes["full"].quantized_layers >= 1
    assert trt.engines[0].compute_capability == "8.6" and trt.engines[0].trt_version == "10.3"


def test_an_unknown_format_version_is_refused_naming_it(bundles):
    for version in (FORMAT_VERSION + 1, 0, "1", None):
        d = {**_raw(bundles["split"]), "format_version": version}
        with pytest.raises(BundleError, match=rf"format_version {version!r} is not supported by this "
                                              rf"runtime \(it reads version {FORMAT_VERSION}\)"):
            Manifest.from_dict(d, "m.json")


def test_a_registered_migration_chain_reads_an_older_version(bundles, monkeypatch):
    """A version-0 manifest that called ``limits`` ``bounds`` is read once a 0 -> 1 step is
    registered; it is refused (naming the versions read) while none is."""
    current = _raw(bundles["split"])
    old = {k: v for k, v in current.items() if k != "limits"} | {"format_version": 0, "bounds": current["limits"]}
    with pytest.raises(BundleError, match=r"format_version 0 is not supported .*reads version 1\)"):
        Manifest.from_dict(old, "m.json")

    def zero_to_one(d):
        d["limits"] = d.pop("bounds")
        return d

    monkeypatch.setitem(manifest_mod.MIGRATIONS, 0, zero_to_one)
    assert manifest_mod.supported_versions() == [0, 1]
    m = Manifest.from_dict(old, "m.json")
    assert m.format_version == FORMAT_VERSION and m.limits.max_candidates == current["limits"]["max_candidates"]
    assert m.to_dict() == current


def test_inspect_on_a_corrupted_field_prints_one_line_and_exits_2(bundles, tmp_path, capsys):
    """Unsigned: the schema error. Signed then edited: ``--verify`` refuses the signature
    before any field is read, and without a key the schema error is still what is shown."""
    from runtime.signing import generate_key, sign_bundle

    b = shutil.copytree(bundles["split"], tmp_path / "b")
    (b / MANIFEST_NAME).write_text(json.dumps(_mutated(_raw(b), ("stages", "user", "intra_op_threads"), "x")))
    capsys.readouterr()
    assert main(["inspect", str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{b / MANIFEST_NAME}: stages.user.intra_op_threads: expected an int >= 1, got 'x'" in err

    signed = shutil.copytree(bundles["split"], tmp_path / "signed")
    generate_key(tmp_path / "key")
    sign_bundle(signed, tmp_path / "key")
    (signed / MANIFEST_NAME).write_text(json.dumps(_mutated(_raw(signed), ("limits", "max_candidates"), "x")))
    capsys.readouterr()
    assert main(["inspect", str(signed), "--verify", str(tmp_path / "key.pub")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "signature" in err and "limits.max_candidates" not in err, err
    assert main(["inspect", str(signed)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "limits.max_candidates: expected an int >= 1, got 'x'" in err, err


def test_writers_refuse_a_section_the_runtime_would_refuse(bundles, tmp_path):
    """update_bundle checks what it writes as the runtime reads it: nothing is written."""
    from exporter.steps.write import update_bundle

    b = shutil.copytree(bundles["split"], tmp_path / "b")
    before = (b / MANIFEST_NAME).read_bytes()
    with pytest.raises(BundleError, match=r"engines\[0\]\.dir: required field is missing"):
        update_bundle(b, {}, engines=[{"gpu": "x"}])
    assert (b / MANIFEST_NAME).read_bytes() == before


def _field_paths(cls, prefix: str) -> list[str]:
    from runtime.manifest._fields import ListOf, MapOf, Nullable, Sub

    out = []
    for f in cls.typed_fields():
        out.append(f"{prefix}.{f.name}")
        kind, suffix = f.metadata["kind"], ""
        while isinstance(kind, (Nullable, ListOf, MapOf)):
            suffix += "[]" if isinstance(kind, ListOf) else ".*" if isinstance(kind, MapOf) else ""
            kind = kind.kind
        if isinstance(kind, Sub) and kind.cls is not cls:
            out += _field_paths(kind.cls, f"{prefix}.{f.name}{suffix}")
    return out


def test_the_format_page_lists_every_field():
    """docs/bundle-format.md has a row for every typed field of every section."""
    from pathlib import Path

    from runtime.manifest._fields import ListOf, MapOf, Nullable

    doc = (Path(__file__).parents[1] / "docs" / "bundle-format.md").read_text()
    missing = []
    for key, kind in manifest_mod._LOADERS.items():
        suffix = ""
        while isinstance(kind, (Nullable, ListOf, MapOf)):
            suffix += "[]" if isinstance(kind, ListOf) else ".*" if isinstance(kind, MapOf) else ""
            kind = kind.kind
        missing += [p for p in _field_paths(kind.cls, key + suffix) if f"| `{p}` |" not in doc]
    assert not missing, missing
