"""Property tests: randomly wired small models split into graphs equal to the monolith.

Each model draws a random program over a pool of [B, 4] tensors fed by two user and
two group inputs. Some ops mix batch rows (centring, softmax, cumsum, roll, sort and
a Gram matrix over dim 0); they live in ``Mix`` modules so the test can see, from
``nn_module_stack``, that none of them ever lands in the user graph, and that every
one fed by user inputs alone is named in the report.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from exporter.steps.capture import capture
from graph_passes.fx import SplitUserGroupPass
from tests.graph_passes.test_split_passes import eager, make_spec, request_rows, run_split

ROWWISE = (
    "linear",
    "relu",
    "tanh",
    "add",
    "mul",
    "layer_norm",
    "softmax_last",
    "fold_unfold",
    "outer_sum",
    "stack_sum",
    "expand_sum",
)
MIXING = ("center0", "softmax0", "cumsum0", "roll0", "sort0", "gram0")
TWO_OPERANDS = {"add", "mul", "outer_sum", "stack_sum"}


class Op(nn.Module):
    """One row-wise op on pool tensors."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(4, 4) if kind == "linear" else None

    def forward(self, a, b):
        k = self.kind
        if k == "linear":
            return self.lin(a)
        if k in ("relu", "tanh"):
            return getattr(torch, k)(a)
        if k == "add":
            return a + b
        if k == "mul":
            return a * b
        if k == "layer_norm":
            return nn.functional.layer_norm(a, (4,))
        if k == "softmax_last":
            return a.softmax(-1)
        if k == "fold_unfold":  # folds the batch into a flat dim and back: still row-wise
            return a.reshape(-1, 2).reshape(a.shape[0], 4) * 0.5
        if k == "outer_sum":
            return (a.unsqueeze(2) @ b.unsqueeze(1)).sum(-1) / 4
        if k == "stack_sum":
            return torch.stack([a, b], 1).sum(1)
        return a.unsqueeze(1).expand(-1, 3, 4).sum(1) / 3  # expand_sum


class Mix(nn.Module):
    """One op that mixes rows of the batch (must never be hoisted)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, a, b):
        k = self.kind
        if k == "center0":
            return a - a.mean(0, keepdim=True)
        if k == "softmax0":
            return a.softmax(0)
        if k == "cumsum0":
            return a.cumsum(0) / a.shape[0]
        if k == "roll0":
            return torch.roll(a, 1, 0)
        if k == "sort0":
            return a.sort(0).values
        return a @ (a.t() @ a) / a.shape[0]  # gram0


class Random(nn.Module):
    """A random program: steps[i] = (kind, operand a, operand b) indexing the pool."""

    def __init__(self, steps) -> None:
        super().__init__()
        self.steps = steps
        self.ops = nn.ModuleList(Mix(k) if k in MIXING else Op(k) for k, _, _ in steps)

    def forward(self, u0, u1, g0, g1):
        pool = [u0, u1, g0, g1]
        for op, (_, i, j) in zip(self.ops, self.steps, strict=True):
            pool.append(op(pool[i], pool[j]))
        return sum(p.sum(-1) for p in pool[-3:])


@st.composite
def programs(draw):
    n = draw(st.integers(2, 7))
    steps = []
    for s in range(n):
        kind = draw(st.sampled_from(ROWWISE + MIXING))
        size = 4 + s
        i = draw(st.integers(0, size - 1))
        j = draw(st.integers(0, size - 1)) if kind in TWO_OPERANDS else i
        steps.append((kind, i, j))
    counts = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    return steps, counts


def user_only(steps) -> list[bool]:
    """Which pool entries depend on user inputs alone (u0, u1 and what they feed)."""
    pure = [True, True, False, False]
    for kind, i, j in steps:
        pure.append(pure[i] and pure[j] and kind not in MIXING)  # a blocked op is group-side
    return pure


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(programs())
def test_random_programs_split_equal_the_monolith_and_never_hoist_mixing(program):
    steps, counts = program
    torch.manual_seed(len(steps))
    spec = make_spec({"u0": 4, "u1": 4}, {"g0": 4, "g1": 4})
    model = Random(steps).eval()
    res = SplitUserGroupPass(spec).call(capture(model, spec)).graph_module
    mixing = {f"ops.{k}" for k, (kind, _, _) in enumerate(steps) if kind in MIXING}
    if res.is_split:
        for node in res.user.graph.nodes:
            paths = {p for p, _ in (node.meta.get("nn_module_stack") or {}).values()}
            assert not {p.replace("L['self'].", "") for p in paths} & mixing, node
        users, full, index = request_rows(spec, counts, seed=len(steps))
        ref = eager(model, spec, full)
        assert (run_split(res, users, full, index) - ref).abs().max().item() <= 1e-5
    pure = user_only(steps)
    blocked = {b["module"] for b in res.report["blocked"]}
    for k, (kind, i, j) in enumerate(steps):
        reached = _feeds_output(steps, 4 + k)
        if kind in MIXING and pure[i] and pure[j] and reached:
            assert f"ops.{k}" in blocked, (steps, res.report["blocked"])


def _feeds_output(steps, idx: int) -> bool:
    """Pool entry idx reaches the output (the last three entries) through the steps."""
    live = set(range(4 + len(steps) - 3, 4 + len(steps)))
    for k in range(len(steps) - 1, -1, -1):
        if 4 + k in live:
            live |= {steps[k][1], steps[k][2]}
    return idx in live
