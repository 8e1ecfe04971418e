"""A two-tower student with dict arguments: ``forward(user={...}, item={...})``.

    user tower: MLP([user field embs, user dense, mean of sequence item embs]) -> u [B, K]
    item tower: MLP([item field embs, item dense])                             -> i [B, K]
    ctr = sigmoid(<u, i> + bias)

Its spec addresses dict leaves as ``user.ids``, ``user.dense``, ``user.seq``,
``item.ids``, ``item.dense``, which exercises the spec's ``arg.key`` naming. The whole
user tower is user-only, so a UG split hoists all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from students.base import Features, FieldEmbedding, Student, mlp

__all__ = ["TwoTowerConfig", "TwoTowerStudent"]


@dataclass(frozen=True)
class TwoTowerConfig(Features):
    """Sizes of a two-tower student (defaults: ``tiny``)."""

    emb_dim: int = 8
    tower: tuple[int, ...] = field(default=(64, 32))


class TwoTowerStudent(Student):
    """Dot product of a user tower and an item tower; see the module docstring."""

    input_names = {
        "user_ids": "user.ids",
        "user_dense": "user.dense",
        "user_seq": "user.seq",
        "item_ids": "item.ids",
        "item_dense": "item.dense",
    }

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__(config)
        c = config
        e = c.emb_dim
        self.user_emb = FieldEmbedding(c.n_user_fields, c.vocab, e)
        self.item_emb = FieldEmbedding(c.n_item_fields, c.vocab, e)
        self.user_tower = mlp([(c.n_user_fields + 1) * e + c.n_user_dense, *c.tower])
        self.item_tower = mlp([c.n_item_fields * e + c.n_item_dense, *c.tower])
        self.bias = nn.Parameter(torch.zeros(()))

    def user_vector(self, user: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, K] from the user's ids, dense features and behaviour sequence."""
        seq = self.item_emb.table(user["seq"]).mean(dim=1)  # item-id table (field 0)
        return self.user_tower(
            torch.cat([self.user_emb(user["ids"]).flatten(1), seq, user["dense"]], -1)
        )

    def item_vector(self, item: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, K] from the item's ids and dense features."""
        return self.item_tower(
            torch.cat([self.item_emb(item["ids"]).flatten(1), item["dense"]], -1)
        )

    def logits(self, user: dict[str, torch.Tensor], item: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pre-sigmoid click score [B]."""
        return (self.user_vector(user) * self.item_vector(item)).sum(dim=-1) + self.bias

    def forward(self, user: dict[str, torch.Tensor], item: dict[str, torch.Tensor]) -> torch.Tensor:
        """Click probability ``ctr`` [B]."""
        return torch.sigmoid(self.logits(user, item))
