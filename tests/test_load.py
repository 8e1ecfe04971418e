"""Checkpoint loading refuses what is not what it claims, and never executes pickles."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from exporter.errors import CheckpointError, ExportError
from exporter.load import load_student
from tests.conftest import TOY_SPEC, make_toy_model


class _Exploit:
    """Unpickling this runs code: it would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_from_checkpoint_dir(toy_checkpoint):
    loaded = load_student(toy_checkpoint, trust=("tests",))
    ref = make_toy_model()
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[k], v)
    assert loaded.source["checkpoint_sha256"] and loaded.spec.name == "toy"


def test_pickle_with_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    with open(evil, "wb") as f:
        pickle.dump({"weight": _Exploit(str(marker))}, f)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(TOY_SPEC))
    with pytest.raises(CheckpointError, match="weights_only=True rejected it"):
        load_student(evil, factory="tests.conftest:make_toy_model", spec=spec)
    assert not marker.exists(), "the pickle's code ran"


def test_torch_save_full_module_is_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(make_toy_model(), path)  # a pickled module object, not a state dict
    with pytest.raises(CheckpointError, match="not a plain tensor state dict"):
        load_student(path, factory="tests.conftest:make_toy_model", spec=TOY_SPEC)


def test_plain_state_dict_pt_loads(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(make_toy_model(seed=3).state_dict(), path)
    loaded = load_student(path, factory="tests.conftest:make_toy_model", spec=TOY_SPEC)
    assert torch.equal(loaded.module.head.weight, make_toy_model(seed=3).head.weight)


def test_safetensors_name_on_a_pickle_is_refused(toy_checkpoint, tmp_path):
    d = shutil.copytree(toy_checkpoint, tmp_path / "ck")
    with open(d / "model.safetensors", "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_student(d, trust=("tests",))


def test_weights_of_another_model_are_refused(toy_checkpoint, tmp_path):
    from safetensors.torch import save_file

    d = shutil.copytree(toy_checkpoint, tmp_path / "ck")
    save_file({"other.weight": torch.zeros(2, 2)}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys.*unexpected keys"):
        load_student(d, trust=("tests",))


def test_shape_mismatch_is_named(toy_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(toy_checkpoint, tmp_path / "ck")
    sd = load_file(str(d / "model.safetensors"))
    sd["head.weight"] = torch.zeros(1, 3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"head\.weight: checkpoint \(1, 3\)"):
        load_student(d, trust=("tests",))


def test_bad_factory(tmp_path, toy_checkpoint):
    with pytest.raises(ExportError, match="cannot import module"):
        load_student(toy_checkpoint / "model.safetensors", factory="no_such_pkg.x:y", spec=TOY_SPEC)
    with pytest.raises(ExportError, match="package.module:callable"):
        load_student(toy_checkpoint / "model.safetensors", factory="nocolon", spec=TOY_SPEC)


def test_weights_file_needs_factory_and_spec(toy_checkpoint):
    with pytest.raises(ExportError, match="--factory"):
        load_student(toy_checkpoint / "model.safetensors")


def test_pt2_program_round_trip(tmp_path):
    from exporter.steps.capture import capture
    from runtime.spec import FeatureSpec

    spec = FeatureSpec.from_dict(TOY_SPEC)
    ep = capture(make_toy_model(), spec)
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    loaded = load_student(tmp_path / "m.pt2", spec=TOY_SPEC)
    assert loaded.module is None and loaded.program is not None


def test_corrupt_pt2_refused(tmp_path):
    p = tmp_path / "m.pt2"
    p.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a program saved by torch.export.save"):
        load_student(p, spec=TOY_SPEC)
