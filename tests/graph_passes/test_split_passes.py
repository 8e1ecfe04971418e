"""Unit tests of the FX split passes on tiny inline models captured with torch.export.

Parity is always against the eager model on user rows repeated per candidate (what
a trainer sees); expected FLOPs are worked out by hand from the layer sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from exporter.steps.capture import capture, to_torch_inputs
from graph_passes.fx import (
    FLOPS_KEY,
    PASS_KEY,
    SIDE_KEY,
    FlopCountPass,
    SideAnalysisPass,
    SplitUserGroupPass,
    ceiling,
)
from runtime.sample import sample_rows
from runtime.spec import FeatureSpec

torch.manual_seed(0)


def make_spec(user: dict[str, int], group: dict[str, int], mixed=None) -> FeatureSpec:
    """float32 inputs of width w per name; ``mixed`` = (name, width, user_cols_end)."""
    inputs = [
        {"name": n, "side": "user", "dtype": "float32", "shape": [w]} for n, w in user.items()
    ]
    inputs += [
        {"name": n, "side": "group", "dtype": "float32", "shape": [w]} for n, w in group.items()
    ]
    if mixed:
        name, width, cut = mixed
        cols = {"user": [[0, cut]], "group": [[cut, width]]}
        inputs.append(
            {"name": name, "side": "mixed", "dtype": "float32", "shape": [width], "columns": cols}
        )
    return FeatureSpec.from_dict({"name": "t", "inputs": inputs, "outputs": ["out"]})


def split(model: nn.Module, spec: FeatureSpec):
    ep = capture(model.eval(), spec)
    res = SplitUserGroupPass(spec).call(ep)
    return ep, res


def request_rows(spec: FeatureSpec, counts: list[int], seed: int = 0):
    """Rows for len(counts) users with counts[i] candidates each (mixed: user cols per user)."""
    users = sample_rows(spec, len(counts), seed)
    cands = sample_rows(spec, sum(counts), seed + 1)
    index = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    full = {}
    for s in spec.inputs:
        if s.side == "user":
            full[s.name] = users[s.name][index]
        elif s.side == "mixed":  # the user's columns repeat; the item's columns vary
            c = cands[s.name].copy()
            ucols = s.user_columns()
            c[:, ucols] = users[s.name][index][:, ucols]
            full[s.name] = c
        else:
            full[s.name] = cands[s.name]
    return users, full, index


def eager(model: nn.Module, spec: FeatureSpec, full: dict[str, np.ndarray]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**to_torch_inputs(spec, full))
    return out[0] if isinstance(out, (tuple, list)) else out


def run_split(result, users, full, index) -> torch.Tensor:
    """The split graphs, eagerly: user graph on M users, group graph on N candidates."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        boundary = result.user(*[t(users[n]) for n in result.user_inputs])
        group_in = [t(full[n]) for n in result.group_inputs[: -len(boundary) - 1]]
        return result.group(*group_in, *boundary, t(index))[0]


def assert_parity(model, spec, result, counts=(3, 1, 5), seed=0):
    users, full, index = request_rows(spec, list(counts), seed)
    ref = eager(model, spec, full)
    got = run_split(result, users, full, index)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5


# -- models --------------------------------------------------------------------------------
class UserTower(nn.Module):
    """user MLP (hoistable) x item linear; the user half is 3 nodes."""

    def __init__(self):
        super().__init__()
        self.user = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.item = nn.Linear(3, 8)

    def forward(self, u, g):
        return (self.user(u) * self.item(g)).sum(-1)


class BatchMean(nn.Module):
    """u - u.mean(0): centring over the batch mixes rows."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, u, g):
        h = self.lin(u)
        return (h - h.mean(0) + g).sum(-1)


class TrainBatchNorm(nn.Module):
    """BatchNorm1d in training mode normalises with batch statistics."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3, track_running_stats=False)

    def forward(self, u, g):
        return (self.bn(self.lin(u)) * g).sum(-1)


class InBatchSoftmax(nn.Module):
    """softmax over dim 0: each user's weight depends on the other rows."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, u, g):
        return (torch.softmax(self.lin(u), dim=0) * g).sum(-1)


class Expanded(nn.Module):
    """A user vector expanded over 16 slots before the cross: the cut goes before the expand."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, u, g):
        h = self.lin(u).unsqueeze(1).expand(-1, 16, 3)
        return (h * g.unsqueeze(-1)[:, :1]).sum((1, 2))


class HeadsAttention(nn.Module):
    """nn.MultiheadAttention over user tokens: folds the batch with the heads and unfolds it."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Linear(4, 4 * 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.item = nn.Linear(3, 8)

    def forward(self, u, g):
        t = self.tok(u).view(u.shape[0], 4, 8)
        a, _ = self.mha(t, t, t, need_weights=False)
        return (a.mean(1) * self.item(g)).sum(-1)


class Columns(nn.Module):
    """One input tensor: columns 0..4 are user features, 4..7 item features."""

    def __init__(self):
        super().__init__()
        self.user = nn.Linear(4, 6)
        self.item = nn.Linear(3, 6)

    def forward(self, x):
        u = torch.tanh(self.user(x[:, 0:4]))
        return (u * self.item(x[:, 4:7])).sum(-1)


# -- side analysis -----------------------------------------------------------------------
def test_side_analysis_marks_every_node_and_changes_nothing():
    spec = make_spec({"u": 4}, {"g": 3})
    ep = capture(UserTower().eval(), spec)
    before = str(ep.graph)
    res = SideAnalysisPass(spec).call(ep)
    assert res.modified is False and str(ep.graph) == before
    sides = {n.name: n.meta.get(SIDE_KEY) for n in ep.graph.nodes if n.op != "output"}
    assert sides["u"] == "user" and sides["g"] == "group"
    assert all(sides[n] == "const" for n in sides if n.startswith("p_"))
    linears = [n for n in ep.graph.nodes if "linear" in n.name]
    assert [n.meta[SIDE_KEY] for n in linears] == ["user", "user", "group"]
    assert next(n for n in ep.graph.nodes if n.name == "relu").meta[SIDE_KEY] == "user"
    assert next(n for n in ep.graph.nodes if n.name == "mul").meta[SIDE_KEY] == "group"


def test_side_analysis_refuses_a_program_the_spec_does_not_describe():
    spec = make_spec({"u": 4}, {"g": 3})
    ep = capture(UserTower().eval(), spec)
    other = make_spec({"x": 4}, {"g": 3})
    with pytest.raises(Exception, match="does not declare"):
        SideAnalysisPass(other).call(ep)


# -- the split -----------------------------------------------------------------------------
def test_split_hoists_the_user_tower_and_matches_eager():
    spec = make_spec({"u": 4}, {"g": 3})
    model = UserTower()
    _, res = split(model, spec)
    r = res.graph_module
    assert res.modified and r.is_split
    assert r.user_inputs == ["u"]
    assert r.group_inputs == ["g", r.boundary[0]["name"], "user_index"]
    assert [b["shape"] for b in r.boundary] == [["M", 8]]
    assert r.boundary[0]["source"] == "user.2"
    user_ops = [str(n.target) for n in r.user.graph.nodes if n.op == "call_function"]
    assert user_ops.count("aten.linear.default") == 2
    gathers = [n for n in r.group.graph.nodes if n.meta.get(PASS_KEY) == "SplitUserGroupPass"]
    assert len(gathers) == 1 and gathers[0].target is torch.ops.aten.index_select.default
    assert not any("user.0" in str(n.meta.get("nn_module_stack")) for n in r.group.graph.nodes)
    assert_parity(model, spec, r, counts=(3, 1, 5))
    assert_parity(model, spec, r, counts=(1,))


@pytest.mark.parametrize(
    ("model", "op", "code"),
    [
        (BatchMean(), "aten::mean.dim", "h.mean(0)"),
        (TrainBatchNorm().train(), "batch_norm", "bn"),
        (InBatchSoftmax(), "aten::softmax.int", "dim=0"),
    ],
)
def test_row_mixing_user_op_stays_group_side_and_is_named(model, op, code):
    spec = make_spec({"u": 4}, {"g": 3})
    ep = capture(model, spec) if not model.training else _capture_train(model, spec)
    r = SplitUserGroupPass(spec).call(ep).graph_module
    blocked = r.report["blocked"]
    assert len(blocked) == 1 and op in blocked[0]["op"]
    assert code in blocked[0]["source"] or code == blocked[0]["module"]
    assert "batch" in blocked[0]["reason"]
    hit = next(n for n in ep.graph.nodes if n.name == blocked[0]["node"])
    assert hit.meta[SIDE_KEY] == "group"
    if r.is_split:  # the linear before it is still hoisted; the mixing op runs on candidates
        assert all(
            op.split("::")[-1].split(".")[0] not in str(n.target) for n in r.user.graph.nodes
        )
        _check_parity_in_mode(model, spec, r)


def _capture_train(model, spec):
    kwargs = to_torch_inputs(spec, sample_rows(spec, 3))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    shapes = {s.name: {0: batch} for s in spec.inputs}
    return torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)


def _check_parity_in_mode(model, spec, r):
    users, full, index = request_rows(spec, [2, 4], 3)
    with torch.no_grad():
        ref = model(**to_torch_inputs(spec, full))
    got = run_split(r, users, full, index)
    assert (got - ref).abs().max().item() <= 1e-5


def test_nothing_hoistable_is_reported_not_split():
    class AllMixed(nn.Module):
        def forward(self, u, g):
            return (u - u.mean(0)).sum(-1) + g.sum(-1)

    spec = make_spec({"u": 4}, {"g": 3})
    res = SplitUserGroupPass(spec).call(capture(AllMixed(), spec))
    assert res.modified is False and not res.graph_module.is_split
    assert "mean" in res.graph_module.report["reason"]


def test_boundary_is_cut_before_a_cheap_expand():
    spec = make_spec({"u": 4}, {"g": 3})
    model = Expanded()
    _, res = split(model, spec)
    r = res.graph_module
    assert len(r.boundary) == 1 and np.prod(r.boundary[0]["shape"][1:]) == 3  # not [M, 16, 3]
    assert r.report["moved"] and "smaller" in r.report["moved"][0]["reason"]
    assert_parity(model, spec, r)


def test_multihead_attention_folding_heads_into_the_batch_is_hoisted():
    spec = make_spec({"u": 4}, {"g": 3})
    model = HeadsAttention()
    _, res = split(model, spec)
    r = res.graph_module
    assert r.report["blocked"] == []
    assert "mha" in r.report["hoisted_modules"]
    ops = {str(n.target) for n in r.user.graph.nodes}
    assert "aten.scaled_dot_product_attention.default" in ops
    assert_parity(model, spec, r, counts=(2, 5, 1))


def test_columns_spec_hoists_slices_within_user_columns():
    spec = make_spec({}, {}, mixed=("x", 7, 4))
    model = Columns()
    _, res = split(model, spec)
    r = res.graph_module
    assert r.is_split and r.user_inputs == ["x"] and r.group_inputs[0] == "x"
    assert "user" in r.report["hoisted_modules"] and "item" not in r.report["hoisted_modules"]
    assert [b["shape"] for b in r.boundary] == [["M", 6]]
    users, full, index = request_rows(spec, [3, 1, 4])
    ref = eager(model, spec, full)
    first_rows = {"x": full["x"][np.searchsorted(index, np.arange(3))]}
    got = run_split(r, first_rows, full, index)
    assert (got - ref).abs().max().item() <= 1e-5


def test_flops_by_hand_and_ceiling():
    spec = make_spec({"u": 4}, {"g": 3})
    ep = capture(UserTower().eval(), spec)
    SideAnalysisPass(spec).call(ep)
    res = FlopCountPass(_batch_symbol(ep)).call(ep)
    flops = {n.name: n.meta[FLOPS_KEY] for n in ep.graph.nodes}
    assert flops["linear"] == 2 * 4 * 8 and flops["linear_1"] == 2 * 8 * 8
    assert flops["relu"] == 8 and flops["linear_2"] == 2 * 3 * 8
    u, g = 2 * 4 * 8 + 8 + 2 * 8 * 8, 2 * 3 * 8 + 8 + 8  # group: linear, mul, sum
    assert res.facts["flops"]["user"] == u and res.facts["flops"]["group"] == g
    assert ceiling(u, g, 1) == pytest.approx(1.0)
    assert ceiling(u, g, 512) == pytest.approx((u + g) / (u / 512 + g))


def _batch_symbol(ep):
    u = next(n for n in ep.graph.nodes if n.name == "u")
    return u.meta["val"].shape[0].node.expr


class StraddlingColumns(nn.Module):
    """A slice over columns 2..6 mixes user (0..4) and item (4..7) columns: only the user
    share of ``both`` (its weights on columns 2..3) is hoistable, by the mixed-layer rewrite."""

    def __init__(self):
        super().__init__()
        self.user = nn.Linear(2, 3)
        self.both = nn.Linear(4, 3)

    def forward(self, x):
        return (self.user(x[:, 0:2]) * self.both(x[:, 2:6])).sum(-1)


def test_column_slice_straddling_user_and_item_columns_stays_group_side():
    spec = make_spec({}, {}, mixed=("x", 7, 4))
    model = StraddlingColumns()
    _, res = split(model, spec)
    r = res.graph_module
    assert r.report["hoisted_modules"] == ["both", "user"]  # both: W[:, :2] @ x[:, 2:4] only
    assert [m["module"] for m in r.report["mixed_layers"]["rewritten"]] == ["both"]
    linears = [n for n in r.user.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 2
    users, full, index = request_rows(spec, [2, 3])
    first_rows = {"x": full["x"][np.searchsorted(index, np.arange(2))]}
    got = run_split(r, first_rows, full, index)
    assert (got - eager(model, spec, full)).abs().max().item() <= 1e-5


class BatchFromGroup(nn.Module):
    """The user view takes its batch size from a group input: the symbol must not cross."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, u, g):
        h = self.lin(u).view(g.shape[0], 2, 2).softmax(-1)
        return (h.flatten(1) * g).sum(-1)


def test_batch_size_symbols_are_recomputed_per_side():
    spec = make_spec({"u": 4}, {"g": 4})
    model = BatchFromGroup()
    _, res = split(model, spec)
    r = res.graph_module
    assert r.user_inputs == ["u"]  # no group input sneaks into the user graph for its size
    sizes = [n for n in r.user.graph.nodes if n.target is torch.ops.aten.sym_size.int]
    assert sizes and all(n.args[0].name == "u" for n in sizes)
    assert all(n.meta.get(PASS_KEY) == "SplitUserGroupPass" for n in sizes)
    gsizes = [n for n in r.group.graph.nodes if n.target is torch.ops.aten.sym_size.int]
    assert all(n.args[0].name == "user_index" for n in gsizes)
    assert_parity(model, spec, r, counts=(4, 1, 2))
