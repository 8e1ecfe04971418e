"""A TokenMixer-Large-style UG-Sep student: sparse per-token MoE FFNs on separated tokens.

The feature plumbing is the RankMixer student's (students.rankmixer: field embeddings,
tokenizers, the behaviour-sequence encoder, target attention); user tokens ``xu [B, c_u, D]``
and candidate tokens ``xg [B, c_g, D]`` stay in separate tensors so the split sees every
user-only tensor. Each layer::

    xg += Linear(flatten(xu))                       information compensation (user -> cand)
    mu, mg = mix_tokens(xu, xg)                     masked head-piece mixing (rankmixer):
    xu, xg = LN(xu + mu), LN(xg + mg)               user tokens read user pieces only
    for each side s (its own tokens only):          mixing-and-reverting sparse MoE
        m = mix(x_s)                                  split every token into c_s pieces, regroup
        x_s = LN(x_s + revert(TokenMoE_s(m)))         revert = the inverse regrouping
    x_s += skip * x_s(previous layer input)         inter-layer residual (learned scalar, 0 at init)

``TokenMoE`` (students.moe) is E experts per token position with top-k routing per row;
in training each one records a load-balance loss, summed by ``aux_loss()`` for the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from students.base import Features, mlp
from students.moe import TokenMoE
from students.rankmixer import TokenFrontStudent, mix_tokens

__all__ = ["TokenMixerConfig", "TokenMixerStudent", "mix_side", "revert_side"]


@dataclass(frozen=True)
class TokenMixerConfig(Features):
    """Sizes of a TokenMixer-Large-style student (defaults: ``tiny``)."""

    emb_dim: int = 8
    d_model: int = 32
    n_user_tokens: int = 4
    n_cand_tokens: int = 4
    n_layers: int = 2
    ffn_mult: int = 2
    n_experts: int = 4
    top_k: int = 2
    gate: str = "softmax"
    seq_width: int = 16
    seq_heads: int = 2
    seq_layers: int = 1
    target_heads: int = 2

    def __post_init__(self) -> None:
        t = self.n_user_tokens + self.n_cand_tokens
        for what, n in (("all", t), ("user", self.n_user_tokens), ("candidate", self.n_cand_tokens)):
            if self.d_model % n:
                raise ValueError(f"d_model={self.d_model} must divide into the {n} {what} tokens")


def mix_side(x: torch.Tensor) -> torch.Tensor:
    """[B, c, D] -> [B, c, D]: token h of the output is piece h of every input token."""
    c = x.shape[1]
    return x.unflatten(-1, (c, -1)).transpose(1, 2).flatten(-2)


def revert_side(x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``mix_side`` (the same regrouping: it is an involution)."""
    return mix_side(x)


class TokenMixerLayer(nn.Module):
    """Compensation, masked mixing, then a mixing-and-reverting sparse MoE per side."""

    def __init__(self, c: TokenMixerConfig) -> None:
        super().__init__()
        d, hidden = c.d_model, c.ffn_mult * c.d_model
        self.cg = c.n_cand_tokens
        self.compensate = nn.Linear(c.n_user_tokens * d, c.n_cand_tokens * d)
        nn.init.zeros_(self.compensate.bias)
        moe = dict(n_experts=c.n_experts, top_k=c.top_k, gate=c.gate)
        self.user_moe = TokenMoE(c.n_user_tokens, d, hidden, **moe)
        self.cand_moe = TokenMoE(c.n_cand_tokens, d, hidden, **moe)
        self.user_ln = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])
        self.cand_ln = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])

    def forward(self, xu: torch.Tensor, xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xg = xg + self.compensate(xu.flatten(1)).unflatten(-1, (self.cg, -1))
        mu, mg = mix_tokens(xu, xg)
        xu = self.user_ln[0](xu + mu)
        xg = self.cand_ln[0](xg + mg)
        xu = self.user_ln[1](xu + revert_side(self.user_moe(mix_side(xu))))
        xg = self.cand_ln[1](xg + revert_side(self.cand_moe(mix_side(xg))))
        return xu, xg


class TokenMixerStudent(TokenFrontStudent):
    """TokenMixer-Large-style UG-Sep ranker; see the module docstring."""

    def __init__(self, config: TokenMixerConfig) -> None:
        super().__init__(config)
        c = config
        self._build_front(c)  # the token front RankMixer has (students/rankmixer.py)
        self.layers = nn.ModuleList(TokenMixerLayer(c) for _ in range(c.n_layers))
        self.skip = nn.Parameter(torch.zeros(c.n_layers, 2))  # inter-layer residual scales
        self.head = mlp([2 * c.d_model, c.d_model, 1])

    def logits(self, user_ids, user_dense, user_seq, item_ids, item_dense) -> torch.Tensor:
        """Pre-sigmoid click score [B]."""
        xu, k, v = self.user_side(user_ids, user_dense, user_seq)
        xg = self.candidate_tokens(item_ids, item_dense, k, v)
        prev_u, prev_g = xu, xg
        for i, layer in enumerate(self.layers):
            nu, ng = layer(xu, xg)
            nu, ng = nu + self.skip[i, 0] * prev_u, ng + self.skip[i, 1] * prev_g
            prev_u, prev_g, xu, xg = xu, xg, nu, ng
        pooled = torch.cat([xu.mean(dim=1), xg.mean(dim=1)], dim=-1)
        return self.head(pooled).squeeze(-1)

    def forward(self, user_ids, user_dense, user_seq, item_ids, item_dense) -> torch.Tensor:
        """Click probability ``ctr`` [B]."""
        return torch.sigmoid(self.logits(user_ids, user_dense, user_seq, item_ids, item_dense))

    def aux_loss(self) -> torch.Tensor | None:
        """The MoE layers' load-balance losses of the last training forward, summed."""
        losses = [
            m.balance_loss
            for m in self.modules()
            if isinstance(m, TokenMoE) and m.balance_loss is not None
        ]
        return torch.stack(losses).sum() if losses else None
