"""Column provenance through the FX graph (graph_passes.fx.columns): one mixed input splits by
column through elementwise ops, index_select with constant indices, stack, cat and views;
ORT parity of the split graphs against the eager model."""

from __future__ import annotations

import pytest
import torch

from exporter.steps.split import split_to_onnx
from graph_passes.fx import SplitUserGroupPass
from runtime.spec import FeatureSpec
from tests.graph_passes._mixed_input import capture_x, split_vs_eager_max_abs

SPEC = FeatureSpec.from_dict({"name": "mixedops", "outputs": ["ctr"], "inputs": [{
    "name": "X", "dtype": "float32", "shape": [5], "columns": [
        {"name": "uid", "side": "user", "vocab": 10},
        {"name": "u_dense", "side": "user", "width": 2},
        {"name": "gid", "side": "group", "vocab": 12},
        {"name": "g_dense", "side": "group"}]}]})


class MixedOps(torch.nn.Module):
    """Every op the issue lists on the mixed tensor before anything is sliced apart."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor([1.0, 0.5, 2.0, 1.0, 3.0]))
        self.register_buffer("dense_u", torch.tensor([1, 2]))
        self.emb_u, self.emb_g = torch.nn.Embedding(10, 4), torch.nn.Embedding(12, 4)
        self.tower = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))

    def forward(self, X):
        z = X * self.scale + 0.0  # elementwise on the whole mixed tensor
        ids = torch.stack([X[:, 0], X[:, 3]], 1).long()  # stack of a user and a group column
        du = torch.index_select(z, 1, self.dense_u)  # constant-index gather of user columns
        u = self.tower(torch.cat([du, self.emb_u(ids[:, 0])], -1).reshape(-1, 6))
        g = torch.cat([self.emb_g(ids[:, 1]), z[:, 4:5]], -1)
        return torch.sigmoid((u * g).sum(-1))


def _program(model):
    return capture_x(model, SPEC)


def test_mixed_input_splits_by_column_through_elementwise_gather_stack_cat():
    torch.manual_seed(0)
    result = SplitUserGroupPass(SPEC).call(_program(MixedOps().eval())).graph_module
    assert result.is_split, result.report
    assert "tower.0" in result.report["hoisted_modules"]
    assert not any("emb_g" in m for m in result.report["hoisted_modules"])
    assert result.report["flops"]["user_per_row"] >= 2 * (6 * 8 + 8 * 5)


class StillMixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 1)

    def forward(self, X):
        return torch.sigmoid(self.lin(X * 2.0)).squeeze(-1)


def test_an_op_reading_every_column_stays_group_side():
    """Without the mixed-layer rewrite (graph_passes.fx.hoist_mixed) nothing is hoistable."""
    spec_pass = SplitUserGroupPass(SPEC, hoist_mixed=False)
    result = spec_pass.call(_program(StillMixed().eval())).graph_module
    assert not result.is_split
    assert result.report["flops"]["user_per_row"] == 0


@pytest.mark.slow
def test_split_graphs_match_eager_on_requests(tmp_path):
    torch.manual_seed(0)
    model = MixedOps().eval()
    art = split_to_onnx(_program(model), SPEC, tmp_path)
    assert art.is_split, art.report
    assert split_vs_eager_max_abs(art, model, SPEC, 3, 4, seed=5) <= 1e-5
