"""Shared fixtures: a small real model exported into a real bundle (no mocks)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

TOY_SPEC = {
    "name": "toy",
    "inputs": [
        {"name": "user_ids", "side": "user", "dtype": "int64", "shape": [2], "vocab": 50},
        {"name": "user_dense", "side": "user", "dtype": "float32", "shape": [3]},
        {"name": "item_ids", "side": "group", "dtype": "int64", "shape": [2], "vocab": 40},
        {"name": "item_dense", "side": "group", "dtype": "float32", "shape": [1]},
    ],
    "outputs": ["ctr"],
}


import torch  # noqa: E402

from exporter.trust import model_factory  # noqa: E402

# the toy factory lives here: tests that load its checkpoints trust this package
TRUST = ("tests",)


class Toy(torch.nn.Module):
    """User tower (embeddings + MLP) crossed with item embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.user_emb = torch.nn.Embedding(50, 8)
        self.item_emb = torch.nn.Embedding(40, 8)
        self.user_mlp = torch.nn.Sequential(
            torch.nn.Linear(19, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)
        )
        self.head = torch.nn.Linear(8 + 16 + 1, 1)

    def forward(self, user_ids, user_dense, item_ids, item_dense):
        u = self.user_mlp(torch.cat([self.user_emb(user_ids).flatten(1), user_dense], 1))
        i = self.item_emb(item_ids)
        cross = (u.unsqueeze(1) * i).flatten(1)
        return torch.sigmoid(self.head(torch.cat([u, cross, item_dense], 1))).squeeze(-1)


@model_factory
def make_toy_model(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory):
    """A checkpoint directory in the students' format for the toy model."""
    import json

    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("toy_ckpt")
    model = make_toy_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"factory": "tests.conftest:make_toy_model", "kwargs": {}}))
    (d / "spec.json").write_text(json.dumps(TOY_SPEC))
    return d


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory, toy_checkpoint):
    """A real fp32 bundle exported from the toy checkpoint by the real pipeline."""
    from exporter import ExportOptions, export_bundle, load_student

    out = tmp_path_factory.mktemp("toy_bundle") / "bundle"
    export_bundle(load_student(toy_checkpoint, trust=TRUST), out, ExportOptions(split=False, max_candidates=64))
    return out
