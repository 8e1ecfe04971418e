"""The mixed-layer rewrite (graph_passes.fx.hoist_mixed): Linear / matmul on cat(user, cand)
and the FM sums split into a user part (hoisted) and a group part; FLOPs moved by hand;
ORT parity of the split graphs against the eager model."""

from __future__ import annotations

import pytest
import torch

from exporter.steps.split import split_to_onnx
from graph_passes.fx import SplitUserGroupPass
from runtime.spec import FeatureSpec
from tests.graph_passes._mixed_input import capture_x, split_vs_eager_max_abs

SPEC = FeatureSpec.from_dict({"name": "fmdnn", "outputs": ["ctr"], "inputs": [{
    "name": "X", "dtype": "float32", "shape": [4], "columns": [
        {"name": "uid", "side": "user", "vocab": 10},
        {"name": "gid", "side": "group", "vocab": 12},
        {"name": "u_dense", "side": "user"},
        {"name": "g_dense", "side": "group"}]}]})
E, H = 4, 8


class FmDnn(torch.nn.Module):
    """DeepFM in miniature: fields interleaved user / group, FM + a Linear on the cat."""

    def __init__(self):
        super().__init__()
        self.eu, self.eg = torch.nn.Embedding(10, E), torch.nn.Embedding(12, E)
        self.dnn = torch.nn.Linear(2 * E + 2, H)
        self.out = torch.nn.Linear(H, 1)

    def forward(self, X):
        ids = X[:, :2].long()
        v = torch.stack([self.eu(ids[:, 0]), self.eg(ids[:, 1])], 1)  # [B, 2 fields, E]
        fm = 0.5 * (v.sum(1) ** 2 - (v * v).sum(1)).sum(-1, keepdim=True)
        h = self.dnn(torch.cat([v.flatten(1), X[:, 2:4]], -1)).relu()
        return torch.sigmoid(self.out(h) + fm).squeeze(-1)


def _program(model):
    return capture_x(model, SPEC)


def test_linear_and_fm_sums_are_rewritten_and_their_user_share_hoisted():
    torch.manual_seed(0)
    result = SplitUserGroupPass(SPEC).call(_program(FmDnn().eval())).graph_module
    mixed = result.report["mixed_layers"]
    ops = sorted(r["op"] for r in mixed["rewritten"])
    assert ops == ["aten.linear.default", "aten.sum.dim_IntList", "aten.sum.dim_IntList"]
    assert mixed["user_per_row_before"] == 0
    # user part of dnn: 2·H·(E + 1) (uid embedding + u_dense); the FM's two user sums
    # (Σv and Σv² over the user field) count one FLOP per input element: 2·E
    assert result.report["flops"]["user_per_row"] == 2 * H * (E + 1) + 2 * E
    assert result.report["flops"]["full_per_row"] >= mixed["user_per_row_before"] + mixed["group_per_row_before"]
    assert "dnn" in result.report["hoisted_modules"]


def test_without_the_rewrite_nothing_but_lookups_is_hoisted():
    torch.manual_seed(0)
    result = SplitUserGroupPass(SPEC, hoist_mixed=False).call(_program(FmDnn().eval())).graph_module
    assert result.report["flops"]["user_per_row"] == 0 and "mixed_layers" not in result.report


@pytest.mark.slow
def test_rewritten_split_matches_eager(tmp_path):
    torch.manual_seed(0)
    model = FmDnn().eval()
    art = split_to_onnx(_program(model), SPEC, tmp_path)
    assert art.is_split, art.report
    assert split_vs_eager_max_abs(art, model, SPEC, 3, 5, seed=7) <= 1e-5
