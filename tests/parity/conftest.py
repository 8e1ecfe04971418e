"""A small two-sided model and its real split bundle (full.onnx, user.onnx, group.onnx)."""

from __future__ import annotations

import shutil

import pytest
import torch

from exporter.steps.capture import capture, flat_input_names, to_torch_inputs
from exporter.steps.onnx_build import export_onnx
from exporter.steps.write import BundleWriter
from runtime.sample import sample_rows
from runtime.spec import FeatureSpec

SPLIT_SPEC = {
    "name": "split_toy",
    "inputs": [
        {"name": "user_ids", "side": "user", "dtype": "int64", "shape": [3], "vocab": 40},
        {"name": "user_dense", "side": "user", "dtype": "float32", "shape": [4]},
        {"name": "item_ids", "side": "group", "dtype": "int64", "shape": [2], "vocab": 30},
        {"name": "item_dense", "side": "group", "dtype": "float32", "shape": [2]},
    ],
    "outputs": ["ctr"],
}


class UserTower(torch.nn.Module):
    """User side: two boundary tensors of the same shape (so swapping them type-checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(40, 4)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
        self.proj_a = torch.nn.Linear(16, 8)
        self.proj_b = torch.nn.Linear(16, 8)

    def forward(self, user_ids, user_dense):
        h = self.mlp(torch.cat([self.emb(user_ids).flatten(1), user_dense], 1))
        return torch.tanh(self.proj_a(h)), self.proj_b(h)


class GroupTower(torch.nn.Module):
    """Candidate side: item features crossed with the gathered user tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(30, 4)
        self.item_mlp = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU())
        self.cross = torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, item_ids, item_dense, user_a, user_b, user_index):
        i = self.item_mlp(torch.cat([self.emb(item_ids).flatten(1), item_dense], 1))
        a, b = user_a[user_index], user_b[user_index]
        x = torch.relu(self.cross(torch.cat([i * a, b], 1)))
        return torch.sigmoid(self.head(x)).squeeze(-1)


class SplitToy(torch.nn.Module):
    """The whole model as one eager module (the parity reference)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.user = UserTower()
        self.group = GroupTower()

    def forward(self, user_ids, user_dense, item_ids, item_dense):
        a, b = self.user(user_ids, user_dense)
        idx = torch.arange(item_ids.shape[0], device=item_ids.device)
        return self.group(item_ids, item_dense, a, b, idx)


def build_split_bundle(model: SplitToy, out_dir) -> None:
    """The export pipeline's steps by hand: capture, full.onnx, the real UG split, write."""
    from exporter.steps.split import split_to_onnx

    spec = FeatureSpec.from_dict(SPLIT_SPEC)
    program = capture(model, spec)
    names = flat_input_names(spec, to_torch_inputs(spec, sample_rows(spec, 1)))
    art = split_to_onnx(program, spec)
    assert art.is_split, art.report
    w = BundleWriter(out_dir)
    w.add_stage("full", "full.onnx", export_onnx(program, names, ["ctr"]))
    w.add_stage("user", "user.onnx", art.user)
    w.add_stage("group", "group.onnx", art.group)
    w.finish(model_name=spec.name, spec=spec, split=art.manifest_split(), flops=art.flops)


def boundary_names(bundle_dir) -> list[str]:
    from runtime.manifest import Manifest

    return [b.name for b in Manifest.read(bundle_dir).split.boundary]


@pytest.fixture(scope="session")
def split_model() -> SplitToy:
    return SplitToy().eval()


@pytest.fixture(scope="session")
def split_bundle_master(tmp_path_factory, split_model):
    out = tmp_path_factory.mktemp("parity_split") / "bundle"
    build_split_bundle(split_model, out)
    return out


@pytest.fixture()
def split_bundle(split_bundle_master, tmp_path):
    """A fresh copy per test (parity writes into the bundle)."""
    return shutil.copytree(split_bundle_master, tmp_path / "bundle")
