"""Third-party CTR models (deepctr-torch, FuxiCTR layers) on one synthetic dataset.

Shared by tests/test_third_party.py and benchmarks/bench_third_party.py. Rows follow a
known click model (user affinity x item appeal + price), so AUC deltas mean something.
deepctr-torch models read one float tensor ``X`` whose columns mix user and item fields
(ids stored as floats); the FuxiCTR models read a dict of one tensor per field.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from exporter.trust import model_factory

FIELDS = [  # (name, side, vocab or None for dense)
    ("user_id", "user", 50),
    ("user_age", "user", 8),
    ("user_score", "user", None),
    ("item_id", "group", 60),
    ("item_cat", "group", 6),
    ("item_price", "group", None),
]
DEEPCTR_MODELS = ("DeepFM", "WDL", "DCN", "xDeepFM", "NFM", "AutoInt")
FUXICTR_MODELS = ("FuxiDeepFM", "FuxiDCNv2")


def deepctr_spec(name: str) -> dict:
    """The column-layout spec of the deepctr models' one input ``X``."""
    cols = [{"name": n, "side": s, **({"vocab": v} if v else {})} for n, s, v in FIELDS]
    return {"name": name.lower(), "outputs": ["ctr"],
            "inputs": [{"name": "X", "dtype": "float32", "shape": [len(FIELDS)], "columns": cols}]}


def fuxictr_spec(name: str) -> dict:
    inputs = [{"name": f"X.{n}", "side": s, "dtype": "int64" if v else "float32", "shape": [],
               **({"vocab": v} if v else {})} for n, s, v in FIELDS]
    return {"name": name.lower(), "outputs": ["ctr"], "inputs": inputs}


def synthetic(n_requests: int, candidates: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Requests of one user and ``candidates`` items; columns as FIELDS; label, request_id."""
    r = np.random.default_rng(seed)
    n = n_requests * candidates
    rid = np.repeat(np.arange(n_requests), candidates)
    user = {k: r.integers(0, v, n_requests)[rid] if v else r.standard_normal(n_requests)[rid]
            for k, s, v in FIELDS if s == "user"}
    item = {k: r.integers(0, v, n) if v else r.standard_normal(n) for k, s, v in FIELDS if s == "group"}
    cols = {**user, **item}
    logit = (np.sin(cols["user_id"]) * np.cos(cols["item_id"]) + 0.5 * cols["user_score"]
             - 0.7 * cols["item_price"] + 0.3 * (cols["item_cat"] == cols["user_age"] % 6) - 1.0)
    label = (r.random(n) < 1 / (1 + np.exp(-2 * logit))).astype(np.int64)
    x = np.stack([cols[k] for k, _, _ in FIELDS], 1).astype(np.float32)
    return {"X": x, "label": label, "request_id": rid.astype(np.int64)}


def as_dict_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same rows one array per field (FuxiCTR's layout), named as its spec."""
    out = {f"X.{n}": rows["X"][:, i].astype(np.int64 if v else np.float32)
           for i, (n, _, v) in enumerate(FIELDS)}
    return {**out, "label": rows["label"], "request_id": rows["request_id"]}


@model_factory
def deepctr_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A small deepctr-torch model over FIELDS (registered: checkpoints may name it)."""
    from deepctr_torch import models
    from deepctr_torch.inputs import DenseFeat, SparseFeat

    fc = [SparseFeat(n, v, embedding_dim=4) if v else DenseFeat(n, 1) for n, _, v in FIELDS]
    torch.manual_seed(seed)
    kw = {"task": "binary", "device": "cpu"}
    if name == "AutoInt":
        kw.update(att_layer_num=1, att_head_num=2)
    if name == "xDeepFM":
        kw.update(cin_layer_size=(8, 8))
    return getattr(models, name)(fc, fc, dnn_hidden_units=(16, 8), **kw).eval()


class _FuxiBase(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from fuxictr.features import FeatureMap
        from fuxictr.pytorch.layers import FeatureEmbedding, MLP_Block

        fmap = FeatureMap("synthetic", "")
        fmap.features = OrderedDict(
            (n, {"type": "categorical", "vocab_size": v, "source": s} if v else {"type": "numeric", "source": s})
            for n, s, v in FIELDS
        )
        fmap.num_fields = fmap.input_length = len(FIELDS)
        self.fmap = fmap
        self.emb = FeatureEmbedding(fmap, 4)
        self.mlp = MLP_Block(input_dim=4 * len(FIELDS), output_dim=1, hidden_units=[16],
                             hidden_activations="ReLU")


class FuxiDeepFM(_FuxiBase):
    """DeepFM from FuxiCTR's layers (FeatureEmbedding, FactorizationMachine, MLP_Block)."""

    def __init__(self) -> None:
        super().__init__()
        from fuxictr.pytorch.layers import FactorizationMachine

        self.fm = FactorizationMachine(self.fmap)

    def forward(self, X):
        e = self.emb(X)
        return torch.sigmoid(self.fm(X, e) + self.mlp(e.flatten(1))).squeeze(-1)


class FuxiDCNv2(_FuxiBase):
    """DCNv2 from FuxiCTR's layers (FeatureEmbedding, CrossNetV2, MLP_Block)."""

    def __init__(self) -> None:
        super().__init__()
        from fuxictr.pytorch.layers import CrossNetV2

        self.cross = CrossNetV2(4 * len(FIELDS), 2)

    def forward(self, X):
        return torch.sigmoid(self.mlp(self.cross(self.emb(X, flatten_emb=True)))).squeeze(-1)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name in DEEPCTR_MODELS:
        return deepctr_model(name, seed)
    return {"FuxiDeepFM": FuxiDeepFM, "FuxiDCNv2": FuxiDCNv2}[name]().eval()


def torch_inputs(name: str, rows: dict[str, np.ndarray]) -> dict:
    """forward kwargs for ``name`` from rows in the deepctr layout."""
    if name in DEEPCTR_MODELS:
        return {"X": torch.from_numpy(rows["X"])}
    d = as_dict_rows(rows)
    return {"X": {n: torch.from_numpy(d[f"X.{n}"]) for n, _, _ in FIELDS}}


def train_briefly(model: torch.nn.Module, name: str, rows, steps: int = 30) -> torch.nn.Module:
    """A few full-batch Adam steps on the labels, so scores are not those of random weights."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    y = torch.from_numpy(rows["label"]).float()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        p = model(**torch_inputs(name, rows)).reshape(-1).clamp(1e-6, 1 - 1e-6)
        torch.nn.functional.binary_cross_entropy(p, y).backward()
        opt.step()
    return model.eval()


def save_pt2(model: torch.nn.Module, name: str, rows, path) -> None:
    """What a user does: torch.export with a dynamic batch, torch.export.save."""
    kwargs = torch_inputs(name, {k: v[:4] for k, v in rows.items()})
    b = torch.export.Dim("batch", min=1, max=1 << 20)
    shapes = {"X": {0: b}} if name in DEEPCTR_MODELS else {"X": {n: {0: b} for n, _, _ in FIELDS}}
    ep = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
    torch.export.save(ep, str(path))
