"""A DLRM/DCN-v2-style student: embeddings, a cross network and a deep MLP in parallel.

    x0 = [user field embs, item field embs, mean of the sequence's item embs, dense]
    cross:  x_{l+1} = x0 * (W_l x_l + b_l) + x_l          (explicit feature crosses)
    logit = Linear([x_L, MLP(x0)])

Nothing here is kept apart by side: user and item features meet in the first layer,
so a UG split finds little to hoist beyond the embeddings (a useful contrast).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from students.base import Features, FieldEmbedding, Student, mlp

__all__ = ["DCNConfig", "DCNStudent"]


@dataclass(frozen=True)
class DCNConfig(Features):
    """Sizes of a DCN student (defaults: ``tiny``)."""

    emb_dim: int = 8
    n_cross: int = 2
    cross_rank: int | None = None  # low-rank cross weights U V^T (DCN-v2 style) when set
    deep: tuple[int, ...] = field(default=(64, 32))


class CrossLayer(nn.Module):
    """One DCN-v2 cross: ``x0 * (W x + b) + x``, with ``W = U V^T`` when ``rank`` is set."""

    def __init__(self, dim: int, rank: int | None = None) -> None:
        super().__init__()
        if rank is None:
            self.linear = nn.Linear(dim, dim)
            nn.init.normal_(self.linear.weight, std=0.5 / dim**0.5)
        else:
            self.linear = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class DCNStudent(Student):
    """Embeddings + cross network + MLP; see the module docstring."""

    def __init__(self, config: DCNConfig) -> None:
        super().__init__(config)
        c = config
        e = c.emb_dim
        self.user_emb = FieldEmbedding(c.n_user_fields, c.vocab, e)
        self.item_emb = FieldEmbedding(c.n_item_fields, c.vocab, e)
        dim = (c.n_user_fields + c.n_item_fields + 1) * e + c.n_user_dense + c.n_item_dense
        self.cross = nn.ModuleList(CrossLayer(dim, c.cross_rank) for _ in range(c.n_cross))
        self.deep = mlp([dim, *c.deep], last_act=True)
        self.head = nn.Linear(dim + c.deep[-1], 1)

    def logits(self, user_ids, user_dense, user_seq, item_ids, item_dense) -> torch.Tensor:
        """Pre-sigmoid click score [B]."""
        seq = self.item_emb.table(user_seq).mean(dim=1)  # item-id table (field 0)
        x0 = torch.cat(
            [
                self.user_emb(user_ids).flatten(1),
                self.item_emb(item_ids).flatten(1),
                seq,
                user_dense,
                item_dense,
            ],
            dim=-1,
        )
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.head(torch.cat([x, self.deep(x0)], dim=-1)).squeeze(-1)

    def forward(self, user_ids, user_dense, user_seq, item_ids, item_dense) -> torch.Tensor:
        """Click probability ``ctr`` [B]."""
        return torch.sigmoid(self.logits(user_ids, user_dense, user_seq, item_ids, item_dense))
