"""The split on sparse MoE layers: per-row routing is proven row-wise and hoisted; a router
that normalises over the batch is refused for the user side, with the reason reported.

The models are written here from scratch (not students.moe): a user-side MoE routed by
``torch.topk`` whose experts are gathered by ``table[ids]`` (aten.index with a user-side
index into a constant table) and combined with ``scatter``; and the same with a
batch-level router (softmax over dim 0, as capacity-factor routers normalise assignments
over the rows of a batch). Parity is against the eager model, with each user's row
repeated per candidate (what the trained model sees).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from exporter.steps.split import split_to_onnx
from tests.graph_passes.test_split_passes import eager, make_spec, request_rows, run_split, split

torch.manual_seed(0)
E, K, D, H = 6, 2, 8, 12


class TinyMoE(nn.Module):
    """user x [B, 5] -> MoE (E experts, top-k per row) -> dot with a candidate tower."""

    def __init__(self, batch_router: bool = False) -> None:
        super().__init__()
        self.batch_router = batch_router
        self.inp = nn.Linear(5, D)
        self.router = nn.Linear(D, E)
        self.w1 = nn.Parameter(torch.randn(E, D, H) / D**0.5)
        self.w2 = nn.Parameter(torch.randn(E, H, D) / H**0.5)
        self.item = nn.Linear(3, D)

    def moe(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        if self.batch_router:  # each expert's scores normalised across the rows of the batch
            logits = torch.softmax(logits, dim=0)
        vals, ids = torch.topk(logits, K, dim=-1)
        gates = torch.softmax(vals, dim=-1)
        dense_gates = torch.zeros_like(logits).scatter(1, ids, gates)  # [B, E], 0 if unselected
        w1, w2 = self.w1[ids], self.w2[ids]  # [B, k, D, H], [B, k, H, D]
        h = torch.relu(torch.matmul(x[:, None, None, :], w1))
        out = torch.matmul(h, w2).squeeze(2)  # [B, k, D]
        picked = torch.gather(dense_gates, 1, ids)  # == gates, via the scattered matrix
        return (out * picked.unsqueeze(-1)).sum(1)

    def forward(self, u, i):
        return (self.moe(self.inp(u)) * self.item(i)).sum(-1)


SPEC = make_spec({"u": 5}, {"i": 3})


def test_per_row_routing_is_hoisted_and_matches_eager():
    model = TinyMoE().eval()
    _, res = split(model, SPEC)
    result = res.graph_module
    assert result.is_split, result.report
    hoisted = result.report["hoisted_modules"]
    assert "router" in hoisted and "inp" in hoisted
    ops = {str(n.target) for n in result.user.graph.nodes if n.op == "call_function"}
    assert any("topk" in o for o in ops) and any("scatter" in o for o in ops)
    assert any("index.Tensor" in o for o in ops)  # the expert weights gathered by row
    users, full, index = request_rows(SPEC, [3, 5, 1])
    got = run_split(result, users, full, index)
    want = eager(model, SPEC, full)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_batch_normalising_router_stays_off_the_user_side():
    model = TinyMoE(batch_router=True).eval()
    ep, res = split(model, SPEC)
    report = res.graph_module.report
    blocked = [b for b in report["blocked"] if "softmax" in b["op"]]
    assert blocked, report
    assert "batch" in blocked[0]["reason"] and "dim [0]" in blocked[0]["reason"]
    user_ops = (
        {str(n.target) for n in res.graph_module.user.graph.nodes}
        if res.graph_module.is_split
        else set()
    )
    assert not any("topk" in o for o in user_ops)  # routing after the batch softmax: group side
    # the written split_report.json carries the reason
    art = split_to_onnx(ep, SPEC)
    text = json.dumps(art.manifest_split() or {"report": art.report}, default=str)
    assert "softmax" in text and "rows would mix" in text
    users, full, index = request_rows(SPEC, [4])
    if res.graph_module.is_split:
        got = run_split(res.graph_module, users, full, index)
        np.testing.assert_allclose(got, eager(model, SPEC, full), rtol=1e-5, atol=1e-6)
