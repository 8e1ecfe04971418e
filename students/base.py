"""What every student shares: the feature layout, its spec, embeddings, input plumbing.

A student is an ``nn.Module`` whose ``forward`` takes the spec's inputs as keyword
arguments and returns the click probability ``ctr`` [B] (float32); ``logits`` takes the
same arguments and returns the pre-sigmoid score (used for distillation); and
``feature_spec()`` returns its FeatureSpec as a dict (``runtime.spec`` format).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from students.data import INPUT_NAMES, DataConfig

__all__ = ["Features", "Student", "FieldEmbedding", "model_inputs"]

_SIDES = {
    "user_ids": "user",
    "user_dense": "user",
    "user_seq": "user",
    "item_ids": "group",
    "item_dense": "group",
}


@dataclass(frozen=True)
class Features:
    """Input layout shared by the data generator and a student (defaults: the ``tiny`` data)."""

    n_user_fields: int = 4
    n_user_dense: int = 2
    seq_len: int = 8
    n_item_fields: int = 3
    n_item_dense: int = 2
    vocab: int = 1000
    name: str = "student"

    @classmethod
    def from_data(cls, data: DataConfig, **kwargs: Any):
        """A config of this class whose feature layout matches ``data``."""
        keys = (
            "n_user_fields",
            "n_user_dense",
            "seq_len",
            "n_item_fields",
            "n_item_dense",
            "vocab",
        )
        return cls(**{k: getattr(data, k) for k in keys}, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Student(nn.Module):
    """Base class: the spec, and ``forward`` = sigmoid of ``logits``.

    ``input_names`` maps the generator's names to this model's spec names (the two-tower
    student takes dict arguments, so its names are ``user.ids`` and so on).
    """

    input_names: dict[str, str] = {n: n for n in INPUT_NAMES}

    def __init__(self, config: Features) -> None:
        super().__init__()
        self.config = config

    def logits(self, **inputs: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, **inputs: Any) -> torch.Tensor:
        """Click probability ``ctr`` [B]."""
        return torch.sigmoid(self.logits(**inputs))

    def feature_spec(self) -> dict[str, Any]:
        """The FeatureSpec dict: user inputs are side ``user``, item inputs side ``group``."""
        c = self.config
        shapes = {
            "user_ids": ("int64", c.n_user_fields, c.vocab),
            "user_dense": ("float32", c.n_user_dense, None),
            "user_seq": ("int64", c.seq_len, c.vocab),
            "item_ids": ("int64", c.n_item_fields, c.vocab),
            "item_dense": ("float32", c.n_item_dense, None),
        }
        inputs = []
        for canon in INPUT_NAMES:
            dtype, width, vocab = shapes[canon]
            entry = {
                "name": self.input_names[canon],
                "side": _SIDES[canon],
                "dtype": dtype,
                "shape": [width],
            }
            if vocab is not None:
                entry["vocab"] = vocab
            inputs.append(entry)
        return {"name": c.name, "inputs": inputs, "outputs": ["ctr"]}


class FieldEmbedding(nn.Module):
    """One embedding table per id field, stored as one matrix with per-field row offsets.

    ``forward(ids [B, F]) -> [B, F, E]``. Field 0 has offset 0, so ``table(ids)`` looks ids
    up in field 0's table (the behaviour sequence shares the item-id table this way).
    Gradients are sparse (only looked-up rows), so training touches a few rows of a
    50,000-row table per step instead of all of it; the trainer uses SparseAdam for them.
    """

    def __init__(self, n_fields: int, vocab: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(n_fields * vocab, dim, sparse=True)
        nn.init.normal_(self.table.weight, std=0.05)
        self.register_buffer("offsets", torch.arange(n_fields) * vocab, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids + self.offsets)


def mlp(sizes: list[int], last_act: bool = False) -> nn.Sequential:
    """Linear + ReLU stack over ``sizes``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def model_inputs(
    model: Student, rows: dict[str, np.ndarray], index: np.ndarray | slice | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``model`` from rows keyed by generator or spec names.

    ``arg.key`` spec names are regrouped into dict arguments.
    """
    kwargs: dict[str, Any] = {}
    for canon, name in model.input_names.items():
        if name in rows:
            array = rows[name]
        elif canon in rows:
            array = rows[canon]
        else:
            raise KeyError(f"rows have neither '{name}' nor '{canon}' (keys: {sorted(rows)})")
        t = torch.from_numpy(np.ascontiguousarray(array if index is None else array[index]))
        arg, _, key = name.partition(".")
        if key:
            kwargs.setdefault(arg, {})[key] = t
        else:
            kwargs[arg] = t
    return kwargs
