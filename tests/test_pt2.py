"""``.pt2`` archives (torch.export.save) through the CLI: export, check; a spec that disagrees
with the program's inputs is one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from exporter.cli import main
from exporter.steps.capture import capture
from runtime.spec import FeatureSpec
from tests.conftest import TOY_SPEC, make_toy_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt2")
    torch.export.save(capture(make_toy_model(), FeatureSpec.from_dict(TOY_SPEC)), str(d / "toy.pt2"))
    (d / "spec.json").write_text(json.dumps(TOY_SPEC))
    return d


def test_pt2_exports_splits_and_checks_through_the_cli(pt2, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["export", str(pt2 / "toy.pt2"), "--spec", str(pt2 / "spec.json"),
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split"] is not None and manifest["parity"]["passed"]
    assert main(["check", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0


def _spec_with(**change) -> dict:
    spec = json.loads(json.dumps(TOY_SPEC))
    spec["inputs"][1].update(change)
    return spec


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"shape": [4]}, "input 'user_dense' has shape ['s"),
        ({"dtype": "float64"}, "input 'user_dense' has dtype float32; the spec says float64"),
        ({"name": "dense_u"}, "takes inputs"),
    ],
)
def test_pt2_whose_inputs_disagree_with_the_spec_is_one_line_exit_2(pt2, tmp_path, capsys, change, says):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_spec_with(**change)))
    assert main(["export", str(pt2 / "toy.pt2"), "--spec", str(spec), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_pt2_with_a_static_batch_is_refused_naming_the_input(tmp_path, capsys):
    kwargs = {s["name"]: torch.zeros(3, *s["shape"], dtype=getattr(torch, s["dtype"]))
              for s in TOY_SPEC["inputs"]}
    torch.export.save(torch.export.export(make_toy_model(), (), kwargs), str(tmp_path / "s.pt2"))
    (tmp_path / "spec.json").write_text(json.dumps(TOY_SPEC))
    assert main(["export", str(tmp_path / "s.pt2"), "--out", str(tmp_path / "b")]) == 2
    assert "static batch dim" in capsys.readouterr().err


class _DataDependent(torch.nn.Module):
    """DIEN-style: keeps the rows with a positive length, branches on how many there are."""

    def forward(self, user_ids, user_dense, item_ids, item_dense):
        lengths = user_ids[:, 0]
        kept = lengths[lengths > 0]
        if kept.shape[0] == 0:
            return item_dense.sum(-1)
        return item_dense.sum(-1) + kept.float().mean()


def test_capture_failure_names_the_construct():
    from exporter.errors import ExportError

    with pytest.raises(ExportError) as e:
        capture(_DataDependent(), FeatureSpec.from_dict(TOY_SPEC))
    msg = str(e.value)
    assert "torch.export could not capture 'toy'" in msg and "\n" not in msg
    assert "at test_pt2.py:" in msg and "in forward (`if kept.shape[0] == 0:`)" in msg
