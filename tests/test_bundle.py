"""Bundle verification: tampering, corruption, archives, format versions."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

import runtime
from runtime.bundle import Bundle, pack
from runtime.errors import BundleError


@pytest.fixture()
def bundle_copy(toy_bundle, tmp_path):
    return shutil.copytree(toy_bundle, tmp_path / "b")


def test_clean_bundle_verifies(bundle_copy):
    b = Bundle.open(bundle_copy)
    assert "full.onnx" in b.manifest.files and b.manifest.stages["full"].file == "full.onnx"


def test_one_flipped_byte_is_refused_naming_the_file(bundle_copy):
    p = bundle_copy / "full.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"file 'full\.onnx' does not match its manifest sha256"):
        runtime.load(bundle_copy, allow_unverified=True)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "full.onnx").unlink()
    with pytest.raises(BundleError, match="'full.onnx' is missing"):
        Bundle.open(bundle_copy)


def test_manifest_path_escape_is_refused(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["files"]["../outside"] = {"sha256": "0" * 64}
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="escapes the bundle"):
        Bundle.open(bundle_copy)


def test_unknown_format_version_is_refused(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version 99 is not supported"):
        Bundle.open(bundle_copy)


def test_garbage_manifest_is_refused(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot parse manifest"):
        Bundle.open(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Bundle.open(tmp_path)


def test_tar_round_trip_scores_identically(bundle_copy, tmp_path):
    import numpy as np

    tar = pack(bundle_copy, tmp_path / "b.tar")
    user = {"user_ids": np.array([[1, 2]]), "user_dense": np.zeros((1, 3), np.float32)}
    cands = {"item_ids": np.array([[1, 2], [3, 4]]), "item_dense": np.ones((2, 1), np.float32)}
    a = runtime.load(bundle_copy, allow_unverified=True).score(user, cands)["ctr"]
    b = runtime.load(tar, allow_unverified=True).score(user, cands)["ctr"]
    np.testing.assert_array_equal(a, b)


def test_tar_with_path_traversal_is_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "x.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, arcname="../../escaped.txt")
    with pytest.raises(BundleError, match="cannot unpack"):
        Bundle.open(evil)
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_group_small_stage_needs_a_split_and_a_candidate_bound(bundle_copy):
    """``group_small`` (the group graph for small calls) is only valid beside user + group,
    with ``max_rows`` >= 1: a manifest saying otherwise is refused with the reason."""
    from runtime.manifest import Manifest

    m = json.loads((bundle_copy / "manifest.json").read_text())
    entry = {"file": "full.onnx", "inputs": [], "outputs": []}
    unsplit = {**m, "stages": {**m["stages"], "group_small": {**entry, "max_rows": 8}}}
    with pytest.raises(BundleError, match="'group_small' needs a split bundle"):
        Manifest.from_dict(unsplit)
    split = {**m, "split": {"boundary": []}, "stages": {**m["stages"], "user": entry, "group": entry}}
    assert Manifest.from_dict(split).small_group_rows == 0
    for bad in (None, 0, -3, 2.5, True, "8"):
        small = {**entry} if bad is None else {**entry, "max_rows": bad}
        with pytest.raises(BundleError, match="needs 'max_rows', an int >= 1"):
            Manifest.from_dict({**split, "stages": {**split["stages"], "group_small": small}})
    good = {**split, "stages": {**split["stages"], "group_small": {**entry, "max_rows": 32}}}
    assert Manifest.from_dict(good).small_group_rows == 32
