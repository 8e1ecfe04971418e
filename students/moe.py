"""Sparse per-token mixture of experts: a router per token position, top-k per row, E experts.

    TokenMoE(n_tokens, d_model, hidden, n_experts, top_k, gate)
        x [B, T, D] -> y [B, T, D];  token t of row b runs only its k selected experts

Routing (``route``): logits = einsum(x, router[T, D, E]); the top k by **iterated argmax**,
so ties go to the LOWEST expert index (ArgMax returns the first maximum, in PyTorch and in
ONNX alike; ``torch.topk`` on CPU does not order ties by index, measured); gates are a
softmax over the k selected logits (``gate="softmax"``) or their sigmoids (``"sigmoid"``).
Every routing op works along the expert dim of one (row, token): nothing mixes rows.

Experts (``ExpertBank``): weights stacked per token and expert, ``w1 [T, E, D, H]``,
``b1 [T, E, H]``, ``w2 [T, E, H, D]``, ``b2 [T, E, D]``; two forms, numerically the same:

* ``gather`` (eval default, sparse): the k selected weight slices of each (row, token) are
  gathered by flat index ``t * E + e`` (an embedding lookup: torch.export- and
  ONNX-friendly) and applied with a batched matmul: cost follows k, not E;
* ``dense`` (training default, and the baseline): every expert on every token, weighted by
  the gates scattered into E slots (zero for the experts not selected).

In training the layer records a Switch-style load-balance loss (``balance_loss``: E times the
sum over experts of the share of routed slots times the mean router probability, averaged
over tokens; 1.0 when balanced); it is a batch statistic and exists only in training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ExpertBank", "TokenMoE", "load_balance_loss", "route_topk"]


def route_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [..., k] of the k largest logits, ties to the lowest index.

    k rounds of argmax (first maximum) with the chosen expert masked to -inf: the tie rule
    is the documented one of ``torch.argmax`` and ONNX ``ArgMax`` (``select_last_index=0``).
    """
    ids = torch.arange(logits.shape[-1], device=logits.device)
    vals, idxs = [], []
    for _ in range(k):
        i = logits.argmax(dim=-1, keepdim=True)
        chosen = ids == i
        vals.append(logits.amax(dim=-1, keepdim=True))
        idxs.append(i)
        logits = logits.masked_fill(chosen, float("-inf"))
    return torch.cat(vals, dim=-1), torch.cat(idxs, dim=-1)


class ExpertBank(nn.Module):
    """E two-layer ReLU FFNs per token position; see the module docstring for the forms."""

    def __init__(self, n_tokens: int, n_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        t, e, d, h = n_tokens, n_experts, d_model, hidden
        self.shape = (t, e, d, h)
        self.w1 = nn.Parameter(torch.randn(t, e, d, h) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.zeros(t, e, h))
        self.w2 = nn.Parameter(torch.randn(t, e, h, d) / math.sqrt(h))
        self.b2 = nn.Parameter(torch.zeros(t, e, d))
        self.register_buffer("offsets", torch.arange(t).unsqueeze(-1) * e, persistent=False)
        self.form: str | None = None  # None: dense in training, gather in eval

    def forward(self, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], idx / gates [B, T, k] -> sum_j gates[..., j] * FFN_idx[..., j](x)."""
        form = self.form or ("dense" if self.training else "gather")
        if form == "dense":
            return self.dense(x, idx, gates)
        return self.gather(x, idx, gates)

    def gather(self, x, idx, gates):
        """Only the selected experts: gather their weight slices per (row, token, slot)."""
        t, e, d, h = self.shape
        flat = idx + self.offsets  # [B, T, k] rows of the [T * E, ...] tables
        w1 = F.embedding(flat, self.w1.reshape(t * e, d * h)).unflatten(-1, (d, h))
        w2 = F.embedding(flat, self.w2.reshape(t * e, h * d)).unflatten(-1, (h, d))
        b1 = F.embedding(flat, self.b1.reshape(t * e, h))
        b2 = F.embedding(flat, self.b2.reshape(t * e, d))
        xs = x.unsqueeze(2).unsqueeze(3)  # [B, T, 1, 1, D]
        hid = F.relu(torch.matmul(xs, w1).squeeze(3) + b1)  # [B, T, k, H]
        out = torch.matmul(hid.unsqueeze(3), w2).squeeze(3) + b2  # [B, T, k, D]
        return (out * gates.unsqueeze(-1)).sum(dim=2)

    def dense(self, x, idx, gates):
        """Every expert, weighted by the gates scattered into E slots (0 if not selected)."""
        e = self.shape[1]
        weight = (F.one_hot(idx, e).to(gates.dtype) * gates.unsqueeze(-1)).sum(dim=2)  # [B,T,E]
        hid = F.relu(torch.einsum("btd,tedh->bteh", x, self.w1) + self.b1)
        out = torch.einsum("bteh,tehd->bted", hid, self.w2) + self.b2
        return (out * weight.unsqueeze(-1)).sum(dim=2)


class TokenMoE(nn.Module):
    """Per-token sparse MoE FFN: a router per token position and an ``ExpertBank``."""

    def __init__(
        self,
        n_tokens: int,
        d_model: int,
        hidden: int,
        n_experts: int,
        top_k: int,
        gate: str = "softmax",
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be in 1..n_experts={n_experts}")
        if gate not in ("softmax", "sigmoid"):
            raise ValueError(f"gate '{gate}' is not 'softmax' or 'sigmoid'")
        self.top_k, self.gate = top_k, gate
        self.router = nn.Parameter(torch.randn(n_tokens, d_model, n_experts) / math.sqrt(d_model))
        self.experts = ExpertBank(n_tokens, n_experts, d_model, hidden)
        self.balance_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits [B, T, E], expert ids [B, T, k], gates [B, T, k])."""
        logits = torch.einsum("btd,tde->bte", x, self.router)
        vals, idx = route_topk(logits, self.top_k)
        gates = torch.softmax(vals, dim=-1) if self.gate == "softmax" else torch.sigmoid(vals)
        return logits, idx, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        logits, idx, gates = self.route(x)
        if self.training:
            self.balance_loss = load_balance_loss(logits, idx)
        return self.experts(x, idx, gates)


def load_balance_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balance per token position: E * sum_e share_e * mean_prob_e."""
    e = logits.shape[-1]
    share = F.one_hot(idx, e).float().sum(dim=2).mean(dim=0) / idx.shape[-1]  # [T, E]
    prob = torch.softmax(logits, dim=-1).mean(dim=0)  # [T, E]
    return e * (share * prob).sum(dim=-1).mean()
