"""Boundaries are only what the group side reads; one FLOP ceiling for inspect, bench and the
demo, defined when a side does no arithmetic."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from exporter.cli import main
from exporter.commands.inspect import ceiling
from exporter.steps.split import split_to_onnx
from runtime.ceiling import flop_ceiling
from runtime.manifest import Flops
from runtime.spec import FeatureSpec
from tests.test_split_e2e import DEEPFM_SPEC, _deepfm, _deepfm_rows


@pytest.mark.parametrize(
    ("u", "g", "n", "want"),
    [(0, 807, 200, 1.0), (300, 0, 200, 200.0), (0, 0, 16, 1.0), (100, 100, 100, 200 / 101)],
)
def test_one_ceiling_formula_with_a_side_of_zero_flops(u, g, n, want):
    assert flop_ceiling(u, g, n) == pytest.approx(want)
    assert ceiling(Flops(user_per_row=u, group_per_row=g), n) == pytest.approx(want)


@pytest.mark.slow
def test_boundary_is_exactly_what_group_onnx_reads(tmp_path):
    model = _deepfm()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    x = torch.from_numpy(_deepfm_rows(4, 0))
    ep = torch.export.export(model, (), {"X": x}, dynamic_shapes={"X": {0: batch}}, strict=False)
    art = split_to_onnx(ep, FeatureSpec.from_dict(DEEPFM_SPEC), tmp_path, rows={"X": _deepfm_rows(8, 1)})
    assert art.is_split
    group_in = [i.name for i in onnx.load(art.paths["group"]).graph.input]
    user_out = [o.name for o in onnx.load(art.paths["user"]).graph.output]
    names = [b["name"] for b in art.boundary]
    assert names == user_out
    assert names == [n for n in group_in if n not in ("X", "user_index")]


class _LookupOnlyUser(torch.nn.Module):
    """The user side only looks up an embedding: 0 user FLOPs."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, uid, g):
        return torch.sigmoid((self.emb(uid).squeeze(1) * g).sum(-1))


@pytest.mark.slow
def test_inspect_and_bench_handle_a_user_side_with_zero_flops(tmp_path, capsys):
    spec = {"name": "lookup", "outputs": ["ctr"], "inputs": [
        {"name": "uid", "side": "user", "dtype": "int64", "shape": [1], "vocab": 10},
        {"name": "g", "side": "group", "dtype": "float32", "shape": [4]}]}
    torch.manual_seed(0)
    x = {"uid": torch.zeros(3, 1, dtype=torch.int64), "g": torch.zeros(3, 4)}
    b = torch.export.Dim("batch", min=1, max=1 << 20)
    ep = torch.export.export(_LookupOnlyUser().eval(), (), x, dynamic_shapes={k: {0: b} for k in x})
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "b"
    assert main(["export", str(tmp_path / "m.pt2"), "--out", str(out), "--no-stage-threads"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split"] is not None and manifest["flops"]["user_per_row"] == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    err = capsys.readouterr().err
    assert "N=512: 1.00x" in err and "does no arithmetic" in err
    res = tmp_path / "bench.json"
    assert main(["bench", str(out), "--n", "4", "--repeats", "2", "--no-eager", "--json", str(res), "--png", str(tmp_path / "b.png")]) == 0
    rows = json.loads(res.read_text())["results"]
    assert rows and all(r["ceiling"] == 1.0 for r in rows)
