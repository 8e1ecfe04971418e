"""Small real models with every kind of embedding lookup the store handles (and one it refuses).

``ToyLookups``: user side: a multi-field table with per-field row offsets (nn.Embedding),
mean and max embedding bags over a sequence (nn.EmbeddingBag), and a tiny table (stays in
the graph below the threshold); candidate side: ``F.embedding`` on a parameter, ``W[ids]``
indexing, and a sum bag. Dense part: two small MLP towers and a head.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exporter.trust import model_factory

V, D = 300, 8


def toy_spec(vocab: int = V) -> dict:
    return {
        "name": "toy_lookups",
        "inputs": [
            {"name": "user_ids", "side": "user", "dtype": "int64", "shape": [3], "vocab": vocab},
            {"name": "user_seq", "side": "user", "dtype": "int64", "shape": [6], "vocab": vocab},
            {"name": "user_city", "side": "user", "dtype": "int64", "shape": [1], "vocab": 10},
            {"name": "user_dense", "side": "user", "dtype": "float32", "shape": [4]},
            {"name": "item_ids", "side": "group", "dtype": "int64", "shape": [2], "vocab": vocab},
            {"name": "item_cat", "side": "group", "dtype": "int64", "shape": [1]},  # no vocab: the store checks
            {"name": "item_tags", "side": "group", "dtype": "int64", "shape": [4], "vocab": vocab},
            {"name": "item_dense", "side": "group", "dtype": "float32", "shape": [2]},
        ],
        "outputs": ["ctr"],
    }


class ToyLookups(nn.Module):
    """See the module docstring; ``vocab`` rows per field, ``dim`` wide rows."""

    def __init__(self, vocab: int = V, dim: int = D, seed: int = 0, bags: bool = True) -> None:
        super().__init__()
        self.bags = bags
        torch.manual_seed(seed)
        self.user_emb = nn.Embedding(3 * vocab, dim)
        self.register_buffer("offsets", torch.arange(3) * vocab, persistent=False)
        self.seq_mean = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.seq_max = nn.EmbeddingBag(vocab, dim, mode="max")
        self.city = nn.Embedding(10, 4)
        self.item_w = nn.Parameter(torch.randn(vocab, dim) * 0.5)
        self.cat_w = nn.Parameter(torch.randn(vocab, dim) * 0.5)
        self.tags = nn.EmbeddingBag(vocab, dim, mode="sum")
        self.user_mlp = nn.Sequential(nn.Linear(5 * dim + 4 + 4, 16), nn.ReLU(), nn.Linear(16, 16))
        self.item_mlp = nn.Sequential(nn.Linear(4 * dim + 2, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(32, 1)

    def forward(self, user_ids, user_seq, user_city, user_dense, item_ids, item_cat, item_tags, item_dense):
        u = torch.cat(
            [
                self.user_emb(user_ids + self.offsets).flatten(1),
                self.seq_mean(user_seq) if self.bags else self.seq_mean.weight[user_seq].mean(1),
                self.seq_max(user_seq) if self.bags else self.seq_max.weight[user_seq[:, 0]],
                self.city(user_city).flatten(1),
                user_dense,
            ],
            dim=-1,
        )
        i = torch.cat(
            [F.embedding(item_ids, self.item_w).flatten(1), self.cat_w[item_cat].flatten(1), self._tags(item_tags), item_dense],
            dim=-1,
        )
        hu, hi = self.user_mlp(u), self.item_mlp(i)
        return torch.sigmoid(self.head(torch.cat([hu, hu * hi], dim=-1)).squeeze(-1))


    def _tags(self, item_tags):
        return self.tags(item_tags) if self.bags else F.embedding(item_tags, self.tags.weight).sum(1)


class HashedIds(nn.Module):
    """A lookup whose ids are computed in the graph (a hash): it must stay in the graph."""

    def __init__(self, vocab: int = V) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, D)
        self.vocab = vocab

    def forward(self, user_ids, item_ids):
        u = self.emb((user_ids * 7 + 3) % self.vocab).sum(1)
        return torch.sigmoid((u * self.emb(item_ids).sum(1)).sum(-1))


def hashed_spec() -> dict:
    return {
        "name": "hashed",
        "inputs": [
            {"name": "user_ids", "side": "user", "dtype": "int64", "shape": [2], "vocab": V},
            {"name": "item_ids", "side": "group", "dtype": "int64", "shape": [2], "vocab": V},
        ],
        "outputs": ["ctr"],
    }


def gather_reference(model: ToyLookups, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The looked-up rows each lookup produces, computed with plain tensor indexing."""
    t = {k: torch.from_numpy(v) for k, v in rows.items()}
    vocab = model.seq_mean.weight.shape[0]
    return {
        "user_ids": model.user_emb.weight[t["user_ids"] + torch.arange(3) * vocab],
        "user_seq": model.seq_mean.weight[t["user_seq"]],
        "item_ids": model.item_w[t["item_ids"]],
        "item_cat": model.cat_w[t["item_cat"]],
        "item_tags": model.tags.weight[t["item_tags"]],
    }


@model_factory
def make_toy_lookups(vocab: int = V, dim: int = D, seed: int = 0, bags: bool = True) -> ToyLookups:
    return ToyLookups(vocab, dim, seed, bags).eval()


def write_checkpoint(directory, model: nn.Module, spec: dict, kwargs: dict | None = None):
    """A checkpoint directory in the students' format (config.json names the factory)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    factory = "tests.embstore.models:make_toy_lookups"
    (d / "config.json").write_text(json.dumps({"factory": factory, "kwargs": kwargs or {}}))
    (d / "spec.json").write_text(json.dumps(spec))
    return d
