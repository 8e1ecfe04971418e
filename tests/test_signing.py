"""Signed bundles: `ugsep keygen`, `ugsep export --sign`, `ugsep sign`, and `--verify KEY` on
runtime.load, serve, check and triton refusing unsigned, altered and foreign-key bundles.

Ed25519 (the `cryptography` package) and HMAC-SHA256 are both exercised on real exported
bundles; CLI cases run the real `ugsep` and assert exit 2 with one error line.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.errors import BundleError
from runtime.signing import (
    SignatureError,
    SigningKeyError,
    canonical_manifest,
    generate_key,
    load_key,
    sign_bundle,
)
from tests.test_bundle_checks import _request, assert_one_line_exit_2, edit_manifest, ugsep

KINDS = ("ed25519", "hmac")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Two independent keys per algorithm, made by the real `ugsep keygen`."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b"):
        r = ugsep("keygen", "--out", str(d / f"ed_{name}"))
        assert r.returncode == 0, r.stdout + r.stderr
        r = ugsep("keygen", "--hmac", "--out", str(d / f"hm_{name}"))
        assert r.returncode == 0, r.stdout + r.stderr
        out[name] = {
            "ed25519": {"sign": str(d / f"ed_{name}"), "verify": str(d / f"ed_{name}.pub")},
            "hmac": {"sign": f"hmac:{d / f'hm_{name}'}", "verify": f"hmac:{d / f'hm_{name}'}"},
        }
    return out


@pytest.fixture()
def b(toy_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(toy_bundle, tmp_path / "b"))


def test_keygen_writes_private_files_readable_by_the_owner_only(keys):
    for path in (keys["a"]["ed25519"]["sign"], keys["a"]["hmac"]["sign"].removeprefix("hmac:")):
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    assert Path(keys["a"]["ed25519"]["sign"]).read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert Path(keys["a"]["ed25519"]["verify"]).read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(Path(keys["a"]["hmac"]["sign"].removeprefix("hmac:")).read_text().strip()) == 64


@pytest.mark.parametrize("kind", KINDS)
def test_a_good_signed_bundle_loads_and_scores_identically(b, keys, kind):
    unsigned = runtime.load(b).score(*_request())["ctr"]
    r = ugsep("sign", str(b), "--key", keys["a"][kind]["sign"])
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((b / "manifest.sig").read_text())
    assert doc["algorithm"] == {"ed25519": "ed25519", "hmac": "hmac-sha256"}[kind]
    signed = runtime.load(b, verify=keys["a"][kind]["verify"]).score(*_request())["ctr"]
    np.testing.assert_array_equal(signed, unsigned)


@pytest.mark.parametrize("kind", KINDS)
def test_unsigned_bundle_with_verify_is_refused(b, keys, kind):
    with pytest.raises(SignatureError, match=r"is not signed \(manifest.sig is missing\)"):
        runtime.load(b, verify=keys["a"][kind]["verify"])
    r = ugsep("serve", str(b), "--port", "0", "--verify", keys["a"][kind]["verify"])
    assert_one_line_exit_2(r, "is not signed (manifest.sig is missing)")


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_altered_after_signing_is_refused(b, keys, kind):
    sign_bundle(b, keys["a"][kind]["sign"])
    # an edit no structural check can see: a larger request limit
    edit_manifest(b, lambda m: m["limits"].update(max_candidates=1_000_000))
    with pytest.raises(SignatureError, match="manifest.json does not match its signature in manifest.sig"):
        runtime.load(b, verify=keys["a"][kind]["verify"])
    command = "check" if kind == "ed25519" else "serve"  # both CLIs, one subprocess per case
    r = ugsep(command, str(b), *(["--bundle-only"] if command == "check" else ["--port", "0"]),
              "--verify", keys["a"][kind]["verify"])
    assert_one_line_exit_2(r, "the manifest was altered after signing")


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_altered_after_signing_is_refused(b, keys, kind):
    """The manifest covers every file's sha256: re-hashing an edited file breaks the signature."""
    sign_bundle(b, keys["a"][kind]["sign"])
    (b / "parity.json").write_text(json.dumps({"passed": True}))
    edit_manifest(b, lambda m: m["files"]["parity.json"].update(
        sha256=__import__("hashlib").sha256((b / "parity.json").read_bytes()).hexdigest()))
    runtime.load(b)  # hashes consistent: without --verify nothing tells
    with pytest.raises(SignatureError, match="altered after signing"):
        runtime.load(b, verify=keys["a"][kind]["verify"])


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_key_is_refused(b, keys, kind):
    """Signed by key b (an attacker re-signing works the same): key a refuses it."""
    sign_bundle(b, keys["b"][kind]["sign"])
    with pytest.raises(SignatureError, match=r"was signed by key '[0-9a-f]{16}', not by the verify key"):
        runtime.load(b, verify=keys["a"][kind]["verify"])
    r = ugsep("triton", str(b), "--out", str(b.parent / "repo"), "--verify", keys["a"][kind]["verify"])
    assert_one_line_exit_2(r, "not by the verify key")
    assert not (b.parent / "repo" / "toy").exists()


def test_a_forged_key_id_does_not_help(b, keys):
    """Key id copied from the real signer, signature from another key: the signature check fails."""
    sign_bundle(b, keys["b"]["ed25519"]["sign"])
    doc = json.loads((b / "manifest.sig").read_text())
    doc["key_id"] = load_key(keys["a"]["ed25519"]["verify"]).key_id
    (b / "manifest.sig").write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="does not match its signature"):
        runtime.load(b, verify=keys["a"]["ed25519"]["verify"])


def test_the_verify_key_decides_the_algorithm_not_the_signature_file(b, keys):
    sign_bundle(b, keys["a"]["hmac"]["sign"])
    with pytest.raises(SignatureError, match="signature of algorithm 'hmac-sha256', but the verify key .* is ed25519"):
        runtime.load(b, verify=keys["a"]["ed25519"]["verify"])


@pytest.mark.slow
def test_export_sign_then_check_and_inspect_verify(tmp_path, toy_checkpoint, keys):
    out = tmp_path / "signed"
    r = ugsep("export", str(toy_checkpoint), "--out", str(out), "--no-split", "--trust-module", "tests",
              "--max-candidates", "64", "--sign", keys["a"]["ed25519"]["sign"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "manifest.sig").is_file()
    r = ugsep("check", str(out), "--bundle-only", "--verify", keys["a"]["ed25519"]["verify"])
    assert r.returncode == 0, r.stdout + r.stderr
    r = ugsep("inspect", str(out), "--verify", keys["a"]["ed25519"]["verify"])
    assert r.returncode == 0 and "signature: ed25519 key" in r.stderr + r.stdout
    assert "verified" in r.stderr + r.stdout


def test_export_with_a_public_key_fails_before_exporting(tmp_path, toy_checkpoint, keys):
    r = ugsep("export", str(toy_checkpoint), "--out", str(tmp_path / "x"), "--trust-module", "tests",
              "--sign", keys["a"]["ed25519"]["verify"])
    assert_one_line_exit_2(r, "is an Ed25519 public key: signing needs the private key")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_served_over_http_with_verify(b, keys):
    import httpx

    from runtime.serving import ServerThread, build_app
    from tests.serving.http_utils import json_body

    sign_bundle(b, keys["a"]["ed25519"]["sign"])
    user, cands = _request(5)
    want = runtime.load(b).score(user, cands)["ctr"]
    app = build_app([b], verify=load_key(keys["a"]["ed25519"]["verify"]))
    with ServerThread(app) as srv:
        r = httpx.post(f"{srv.url}/v2/models/toy/infer", json=json_body(user, cands), timeout=30)
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_array_equal(got, want)


def test_a_stale_signature_is_removed_when_the_bundle_is_updated(b, keys):
    from exporter.steps.write import update_bundle

    sign_bundle(b, keys["a"]["hmac"]["sign"])
    update_bundle(b, {"parity.json": {"passed": True, "note": "re-checked"}})
    assert not (b / "manifest.sig").exists()
    with pytest.raises(SignatureError, match="is not signed"):
        runtime.load(b, verify=keys["a"]["hmac"]["verify"])


def test_triton_repository_copies_the_signature_but_not_unlisted_files(b, keys, tmp_path):
    from runtime.triton import write_repository

    sign_bundle(b, keys["a"]["hmac"]["sign"])
    (b / "notes.txt").write_text("not part of the bundle\n")
    with pytest.raises(BundleError, match="'notes.txt' is not listed"):
        write_repository(b, tmp_path / "repo", "cpu", verify=keys["a"]["hmac"]["verify"])
    repo = write_repository(b, tmp_path / "repo", "cpu", verify=keys["a"]["hmac"]["verify"],
                            allow_extra_files=True)
    copied = tmp_path / "repo" / repo.model_name / "1" / "bundle"
    assert (copied / "manifest.sig").is_file() and not (copied / "notes.txt").exists()
    runtime.load(copied, verify=keys["a"]["hmac"]["verify"])  # the copy verifies too


# -- keys ------------------------------------------------------------------------------------
def test_key_files_are_told_apart_explicitly(tmp_path, keys):
    secret = Path(keys["a"]["hmac"]["sign"].removeprefix("hmac:"))
    with pytest.raises(SigningKeyError, match=f"for a shared HMAC-SHA256 secret, name it hmac:{secret}"):
        load_key(secret)
    (tmp_path / "short").write_text("tooshort")
    with pytest.raises(SigningKeyError, match="holds 8 bytes; use at least 32"):
        load_key(f"hmac:{tmp_path / 'short'}")
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_key(tmp_path / "missing.pem")
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_key(keys["a"]["ed25519"]["sign"])


def test_canonical_form_ignores_formatting_but_not_content():
    a = canonical_manifest(json.loads('{"b": 1, "a": [1, 2.5, "é"]}'))
    b = canonical_manifest(json.loads('{\n  "a": [1, 2.5, "é"],\n  "b": 1\n}'))
    assert a == b == '{"a":[1,2.5,"é"],"b":1}'.encode()
    assert canonical_manifest({"a": [1, 2.5, "é"], "b": 2}) != a


def test_runtime_imports_cryptography_only_for_an_ed25519_key(b, keys):
    """`import runtime` (and an HMAC-verified load) stays free of `cryptography`."""
    import subprocess
    import sys

    from tests.test_bundle_checks import ROOT

    sign_bundle(b, keys["a"]["hmac"]["sign"])
    code = ("import sys, runtime\n"
            f"runtime.Bundle.open({str(b)!r}, key={keys['a']['hmac']['verify']!r})\n"
            "print('cryptography' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
