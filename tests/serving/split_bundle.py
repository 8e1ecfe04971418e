"""Hand-made split bundles for the serving tests (until the exporter's split pass lands).

A tiny two-part torch model: ``UserPart`` (user features -> boundary tensor ``user_vec``)
and ``GroupPart`` (candidate features + boundary [M, ...] + ``user_index`` [N] ->
``ctr`` [N]). Each part and the composed full model are exported with
``torch.onnx.export(dynamo=True)`` into a bundle with a real manifest (sha256 of
every file) — the same layout the exporter writes.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from runtime.bundle import sha256_file
from runtime.manifest import DEFAULT_LIMITS, Manifest
from runtime.spec import FeatureSpec

SPLIT_SPEC = {
    "name": "toysplit",
    "inputs": [
        {"name": "user_ids", "side": "user", "dtype": "int64", "shape": [3], "vocab": 50},
        {"name": "user_dense", "side": "user", "dtype": "float32", "shape": [4]},
        {"name": "item_ids", "side": "group", "dtype": "int64", "shape": [2], "vocab": 40},
        {"name": "item_dense", "side": "group", "dtype": "float32", "shape": [2]},
    ],
    "outputs": ["ctr"],
}
BOUNDARY = "user_vec"


class UserPart(torch.nn.Module):
    """User features -> one boundary tensor [M, dim]."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 32, n_ids: int = 3, n_dense: int = 4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(8 * n_ids + n_dense, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, dim)
        )

    def forward(self, user_ids, user_dense):
        return self.mlp(torch.cat([self.emb(user_ids).flatten(1), user_dense], 1))


class GroupPart(torch.nn.Module):
    """Candidate features + boundary [M, dim] + user_index [N] -> ctr [N]."""

    def __init__(self, vocab: int = 40, dim: int = 16, n_ids: int = 2, n_dense: int = 2, hidden: int = 32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim * (n_ids + 1) + n_dense, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )

    def forward(self, item_ids, item_dense, user_vec, user_index):
        u = torch.index_select(user_vec, 0, user_index)
        i = self.emb(item_ids)  # [N, n_ids, dim]
        cross = (u.unsqueeze(1) * i).flatten(1)
        return torch.sigmoid(self.mlp(torch.cat([u, cross, item_dense], 1))).squeeze(-1)


class FullModel(torch.nn.Module):
    """The unsplit model: one user row per candidate (what a trainer sees)."""

    def __init__(self, user: UserPart, group: GroupPart):
        super().__init__()
        self.user, self.group = user, group

    def forward(self, user_ids, user_dense, item_ids, item_dense):
        idx = torch.arange(item_ids.shape[0], device=item_ids.device)
        return self.group(item_ids, item_dense, self.user(user_ids, user_dense), idx)


def make_parts(seed: int = 0, **sizes) -> tuple[UserPart, GroupPart]:
    """Deterministic random weights (``seed`` changes the model, e.g. for a reload)."""
    torch.manual_seed(seed)
    return UserPart(**sizes.get("user", {})).eval(), GroupPart(**sizes.get("group", {})).eval()


def _export(module: torch.nn.Module, args: tuple, names: list[str], outputs: list[str], dims: dict) -> bytes:
    dyn = {n: dims.get(n, {0: torch.export.Dim.DYNAMIC}) for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module, args, dynamo=True, input_names=names, output_names=outputs,
            dynamic_shapes=dyn, opset_version=18, verbose=False,
        )
    return prog.model_proto.SerializeToString()


def write_split_bundle(
    out: str | Path, user: UserPart, group: GroupPart, spec: dict = SPLIT_SPEC,
    *, max_candidates: int = DEFAULT_LIMITS["max_candidates"], model_name: str | None = None,
) -> Path:
    """Export ``user``/``group``/full ONNX files and write a verified, parity-passed bundle."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fspec = FeatureSpec.from_dict(spec)
    rows = {s.name: _sample(s, 3) for s in fspec.inputs}
    u_names = [s.name for s in fspec.user_inputs]
    g_names = [s.name for s in fspec.group_inputs]
    with torch.no_grad():
        u_args = tuple(torch.from_numpy(rows[n]) for n in u_names)
        g_args = tuple(torch.from_numpy(rows[n]) for n in g_names)
        boundary = user(*u_args)
        idx = torch.tensor([0, 0, 0])
    files = {
        "user.onnx": _export(user, u_args, u_names, [BOUNDARY], {}),
        "group.onnx": _export(
            group, (*g_args, boundary[:1], idx), [*g_names, BOUNDARY, "user_index"], list(fspec.outputs),
            {BOUNDARY: {0: torch.export.Dim.DYNAMIC}},
        ),
        "full.onnx": _export(FullModel(user, group), (*u_args, *g_args), [*u_names, *g_names], list(fspec.outputs), {}),
    }
    for rel, data in files.items():
        (out / rel).write_bytes(data)
    (out / "parity.json").write_text(json.dumps({"passed": True, "note": "hand-made test bundle"}))
    stages = {
        "full": {"file": "full.onnx", "inputs": [*u_names, *g_names], "outputs": list(fspec.outputs)},
        "user": {"file": "user.onnx", "inputs": u_names, "outputs": [BOUNDARY]},
        "group": {"file": "group.onnx", "inputs": [*g_names, BOUNDARY, "user_index"], "outputs": list(fspec.outputs)},
    }
    manifest = Manifest(
        model_name=model_name or fspec.name, spec=fspec, stages=stages,
        files={p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(out.iterdir())
               if p.name != "manifest.json"},
        toolchain_version="test", created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
        split={"boundary": [{"name": BOUNDARY, "dtype": "float32", "shape": ["M", *boundary.shape[1:]],
                             "source": "hand-made"}], "user_index": "user_index", "report": {}},
        parity={"passed": True, "summary": {"note": "hand-made test bundle"}, "report": "parity.json"},
        limits={**DEFAULT_LIMITS, "max_candidates": max_candidates},
    )
    (out / "manifest.json").write_text(manifest.dumps())
    return out


def _sample(s, n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    if s.is_integer:
        return rng.integers(0, s.vocab or 10, size=(n, *s.shape)).astype(s.dtype)
    return rng.standard_normal((n, *s.shape)).astype(s.dtype)


def eager_scores(user: UserPart, group: GroupPart, user_feats: dict, cands: dict) -> np.ndarray:
    """Reference scores from the eager torch model for one request (user rows [1, ...])."""
    n = next(iter(cands.values())).shape[0]
    with torch.no_grad():
        u = user(*(torch.from_numpy(np.asarray(user_feats[k]).reshape(1, -1)) for k in ("user_ids", "user_dense")))
        out = group(torch.from_numpy(cands["item_ids"]), torch.from_numpy(cands["item_dense"]), u,
                    torch.zeros(n, dtype=torch.int64))
    return out.numpy()


def renamed_copy(src: str | Path, dst: str | Path, model_name: str) -> Path:
    """A copy of a bundle served under another model name (the manifest is not hashed)."""
    import shutil

    dst = Path(shutil.copytree(src, dst))
    data = json.loads((dst / "manifest.json").read_text())
    data["model_name"] = model_name
    (dst / "manifest.json").write_text(json.dumps(data, indent=2))
    return dst


def perturbed_copy(src: str | Path, dst: str | Path, scale: float = 1.25) -> Path:
    """A new version of a bundle: every float initializer scaled, sha256s rewritten (no re-export)."""
    import shutil

    import onnx
    from onnx import numpy_helper

    dst = Path(shutil.copytree(src, dst))
    data = json.loads((dst / "manifest.json").read_text())
    for rel in ("user.onnx", "group.onnx", "full.onnx"):
        model = onnx.load(str(dst / rel))
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.dtype == np.float32:
                init.CopyFrom(numpy_helper.from_array(arr * np.float32(scale), init.name))
        onnx.save(model, str(dst / rel))
        data["files"][rel] = {"sha256": sha256_file(dst / rel), "bytes": (dst / rel).stat().st_size}
    (dst / "manifest.json").write_text(json.dumps(data, indent=2))
    return dst
