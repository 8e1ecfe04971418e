"""A bundle that cannot lie: each tamper class of issue 18 on a real exported split bundle.

Every test edits a copy of a bundle exported by the real pipeline the way an attacker or a
careless operator would (keeping the manifest's sha256 entries consistent where the
attack needs it), then asserts the runtime refuses it with a BundleError naming the file
and the mismatch; the CLI cases run the real ``ugsep`` (serve / check) and assert exit 2,
one line, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.bundle import Bundle
from runtime.errors import BundleError
from tests.conftest import TRUST, make_toy_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split_bundle(tmp_path_factory, toy_checkpoint):
    """The toy model exported split (full, user, group) with parity by the real pipeline."""
    from exporter import ExportOptions, export_bundle, load_student

    out = tmp_path_factory.mktemp("toy_split") / "bundle"
    export_bundle(load_student(toy_checkpoint, trust=TRUST), out, ExportOptions(max_candidates=64))
    return out


@pytest.fixture()
def b(split_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(split_bundle, tmp_path / "b"))


def edit_manifest(root: Path, fn) -> None:
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m, indent=2))


def _sha(p: Path) -> dict:
    return {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}


def _request(n: int = 4):
    rng = np.random.default_rng(1)
    user = {"user_ids": rng.integers(0, 50, (1, 2)), "user_dense": rng.standard_normal((1, 3)).astype(np.float32)}
    cands = {"item_ids": rng.integers(0, 40, (n, 2)), "item_dense": rng.standard_normal((n, 1)).astype(np.float32)}
    return user, cands


def ugsep(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *argv], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def assert_one_line_exit_2(r: subprocess.CompletedProcess, *needles: str) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out and "KeyError" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_the_untampered_split_bundle_loads_and_scores_like_eager(b):
    import torch

    user, cands = _request()
    got = runtime.load(b).score(user, cands)["ctr"]
    n = len(cands["item_ids"])
    with torch.no_grad():
        want = make_toy_model()(torch.from_numpy(np.repeat(user["user_ids"], n, 0)),
                                torch.from_numpy(np.repeat(user["user_dense"], n, 0)),
                                torch.from_numpy(cands["item_ids"]), torch.from_numpy(cands["item_dense"])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- vocabularies ---------------------------------------------------------------------------
def test_edited_vocab_is_refused_naming_the_table(b):
    # user_emb has 50 rows: vocab 60 would let ids 50..59 through validation
    edit_manifest(b, lambda m: m["spec"]["inputs"][0].update(vocab=60))
    with pytest.raises(BundleError) as e:
        runtime.load(b)
    msg = str(e.value)
    assert "input 'user_ids' has vocab 60" in msg and "table 'user_emb.weight' of 50 rows" in msg
    assert "graph 'full.onnx'" in msg or "graph 'user.onnx'" in msg


def test_edited_vocab_through_serve_exits_2_in_one_line(b):
    edit_manifest(b, lambda m: m["spec"]["inputs"][2].update(vocab=41))  # item_emb: 40 rows
    r = ugsep("serve", str(b), "--port", "0")
    assert_one_line_exit_2(r, "input 'item_ids' has vocab 41", "table 'item_emb.weight' of 40 rows")


# -- stages pointed at other graphs ---------------------------------------------------------
def test_stage_pointed_at_another_stages_file_is_refused(b):
    edit_manifest(b, lambda m: m["stages"]["user"].update(file="group.onnx"))
    with pytest.raises(BundleError, match="stages 'user' and 'group' both point at 'group.onnx'"):
        Bundle.open(b)


def test_stage_pointed_at_another_file_with_its_sha256_is_refused(b):
    """group.onnx replaced by the user graph, with the user graph's sha256 and I/O names in
    the manifest: every hash matches, but the graph is not a group graph."""
    shutil.copyfile(b / "user.onnx", b / "group.onnx")

    def fn(m):
        m["files"]["group.onnx"] = _sha(b / "group.onnx")
        m["stages"]["group"].update(inputs=["user_ids", "user_dense"], outputs=["u_linear_1"])

    edit_manifest(b, fn)
    with pytest.raises(BundleError) as e:
        runtime.load(b)
    assert "stage 'group' graph 'group.onnx' has input 'user_ids', which is not a candidate input" in str(e.value)


def test_user_stage_on_the_group_graph_is_refused_not_a_key_error(b):
    """user <-> group swapped with consistent I/O lists: the server used to die with a
    KeyError traceback at its first request."""

    def fn(m):
        u, g = m["stages"]["user"], m["stages"]["group"]
        m["stages"]["user"], m["stages"]["group"] = {**g}, {**u}

    edit_manifest(b, fn)
    with pytest.raises(BundleError) as e:
        runtime.load(b)
    assert "stage 'user' graph 'group.onnx' has input 'item_ids', which is not a user-side input" in str(e.value)
    assert_one_line_exit_2(ugsep("serve", str(b), "--port", "0"), "stage 'user' graph 'group.onnx'")


def test_full_stage_on_the_user_graph_is_refused_for_its_missing_output(b):
    shutil.copyfile(b / "user.onnx", b / "full2.onnx")

    def fn(m):
        m["files"]["full2.onnx"] = _sha(b / "full2.onnx")
        m["stages"]["full"].update(file="full2.onnx", inputs=["user_ids", "user_dense"], outputs=["u_linear_1"])
        del m["files"]["full.onnx"]

    (b / "full.onnx").unlink()
    edit_manifest(b, fn)
    with pytest.raises(BundleError, match=r"stage 'full' graph 'full2.onnx' has no output 'ctr'"):
        Bundle.open(b)


@pytest.mark.parametrize("where, value, expected", [
    (("spec", 3, "dtype"), "float64", "input 'item_dense' is float32 in the graph; the manifest says float64"),
    (("spec", 1, "shape"), [4], "input 'user_dense' has shape [batch, 3] in the graph; the manifest says [batch, 4]"),
    (("boundary", 0, "shape"), ["M", 9], "output 'u_linear_1' has shape [M, 8] in the graph; the manifest says [M, 9]"),
])
def test_dtype_and_shape_edits_are_refused(b, where, value, expected):
    section, i, key = where

    def fn(m):
        (m["spec"]["inputs"] if section == "spec" else m["split"]["boundary"])[i][key] = value

    edit_manifest(b, fn)
    with pytest.raises(BundleError) as e:
        Bundle.open(b)
    assert expected in str(e.value)


def test_a_garbage_graph_with_a_matching_sha256_is_a_bundle_error(b):
    (b / "group.onnx").write_bytes(b"\x0b" * 64)
    edit_manifest(b, lambda m: m["files"].update({"group.onnx": _sha(b / "group.onnx")}))
    with pytest.raises(BundleError, match="'.*group.onnx' is not a readable ONNX model"):
        Bundle.open(b)


# -- files the manifest does not list, links, paths -----------------------------------------
def test_extra_py_file_is_refused_or_ignored_with_a_warning_when_allowed(b, caplog):
    (b / "evil.py").write_text("import os; os.system('touch /tmp/PWNED')\n")
    with pytest.raises(BundleError) as e:
        runtime.load(b)
    assert "file 'evil.py' is not listed in the manifest" in str(e.value)
    assert "--allow-extra-files" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="runtime.bundle_checks"):
        scorer = runtime.load(b, allow_extra_files=True)
    assert "ignoring files the manifest does not list: evil.py" in caplog.text
    assert scorer.score(*_request())["ctr"].shape == (4,)


def test_extra_file_through_check_exits_2_in_one_line(b):
    (b / "engines").mkdir()
    (b / "engines" / "hook.py").write_text("print('hi')\n")
    assert_one_line_exit_2(ugsep("check", str(b), "--bundle-only"), "file 'engines/hook.py' is not listed")


def test_symlink_to_a_system_file_is_refused_even_when_extra_files_are_allowed(b):
    os.symlink("/etc/passwd", b / "passwd")
    for allow in (False, True):
        with pytest.raises(BundleError, match=r"'passwd' is a symbolic link \(to '/etc/passwd'\)"):
            Bundle.open(b, allow_extra_files=allow)


def test_listed_file_replaced_by_a_symlink_is_refused(b, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copyfile(b / "parity.json", outside)
    (b / "parity.json").unlink()
    os.symlink(outside, b / "parity.json")  # same bytes, same sha256: only the link gives it away
    with pytest.raises(BundleError, match="'parity.json' is a symbolic link"):
        runtime.load(b)


def test_path_escaping_the_bundle_is_refused(b):
    """A stage graph outside the bundle (../), with its true sha256 in the manifest."""
    outside = b.parent / "outside.onnx"
    shutil.copyfile(b / "full.onnx", outside)

    def fn(m):
        m["files"]["../outside.onnx"] = _sha(outside)
        m["stages"]["full"]["file"] = "../outside.onnx"

    edit_manifest(b, fn)
    with pytest.raises(BundleError, match=r"file path '\.\./outside\.onnx' escapes the bundle"):
        runtime.load(b)
    assert_one_line_exit_2(ugsep("serve", str(b), "--port", "0"), "'../outside.onnx' escapes the bundle")


def test_absolute_path_is_refused(b):
    edit_manifest(b, lambda m: m["files"].update({"/etc/passwd": {"sha256": "0" * 64}}))
    with pytest.raises(BundleError, match="file path '/etc/passwd' escapes the bundle"):
        Bundle.open(b)


def test_engine_directory_outside_the_bundle_is_refused(b):
    """The TensorRT backend opens <dir>/<stage>.plan: a dir outside the bundle is refused."""
    edit_manifest(b, lambda m: m.update(engines=[{"dir": "../../tmp/engines", "gpu": "x"}]))
    with pytest.raises(BundleError, match=r"file path '\.\./\.\./tmp/engines' escapes the bundle"):
        Bundle.open(b)
