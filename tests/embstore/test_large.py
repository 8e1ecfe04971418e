"""A student whose embedding tables exceed 2 GiB: export, check, serve; the store is mmapped.

The model is built here from a seed (nothing shipped): one user table of 9,000,000 x 64 fp32
rows (2.15 GiB) looked up by two id fields with row offsets, a small item table that stays
in the graph, and a tiny dense part. Export moves the big table to the store (the graphs stay
small), parity runs against the eager model on held-out requests, ``ugsep check
--bundle-only`` verifies the bundle, a real HTTP server scores it, and a fresh process that
loads the bundle and scores requests stays far below the table's size in resident memory.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from torch import nn

from exporter import ExportOptions, LoadedModel, export_bundle
from exporter.cli import main
from exporter.steps.capture import to_torch_inputs
from runtime.sample import sample_requests
from runtime.serving import ServerThread, build_app
from runtime.spec import FeatureSpec
from tests.serving.http_utils import triton_scores

pytestmark = pytest.mark.slow
FIELD_VOCAB, DIM = 4_500_000, 64  # 2 fields -> 9,000,000 rows x 64 x 4 B = 2.15 GiB
SPEC = {
    "name": "big_tables",
    "inputs": [
        {"name": "user_ids", "side": "user", "dtype": "int64", "shape": [2], "vocab": FIELD_VOCAB},
        {"name": "user_dense", "side": "user", "dtype": "float32", "shape": [2]},
        {"name": "item_ids", "side": "group", "dtype": "int64", "shape": [1], "vocab": 1000},
    ],
    "outputs": ["ctr"],
}


class BigTables(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        weight = torch.empty(2 * FIELD_VOCAB, DIM)
        for i in range(0, weight.shape[0], 1 << 20):  # seeded, chunk by chunk (no 2nd copy)
            weight[i : i + (1 << 20)].normal_(0.0, 0.1, generator=g)
        self.user_emb = nn.Embedding.from_pretrained(weight, freeze=True)
        self.register_buffer("offsets", torch.arange(2) * FIELD_VOCAB, persistent=False)
        self.item_emb = nn.Embedding(1000, DIM)
        self.user = nn.Linear(2 * DIM + 2, 16)
        self.item = nn.Linear(DIM, 16)

    def forward(self, user_ids, user_dense, item_ids):
        u = torch.relu(self.user(torch.cat([self.user_emb(user_ids + self.offsets).flatten(1), user_dense], 1)))
        i = self.item(self.item_emb(item_ids).flatten(1))
        return torch.sigmoid((u * i).sum(-1))


def _vm_rss_mib_script(bundle: str) -> str:
    return f"""
import json, numpy as np, runtime
from runtime.sample import sample_requests
from runtime.spec import FeatureSpec
s = runtime.load({bundle!r}, "onnxruntime")
spec = s.spec
rows, rid = sample_requests(spec, 50, 20, seed=3)
for r in range(50):
    idx = rid == r
    s.score({{k.name: rows[k.name][idx][:1] for k in spec.user_inputs}}, {{k.name: rows[k.name][idx] for k in spec.group_inputs}})
rss = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")][0]
print(json.dumps({{"rss_mib": rss / 1024, "torch": "torch" in __import__("sys").modules}}))
"""


def test_student_over_2gib_exports_checks_and_serves_from_a_mmapped_store(tmp_path):
    spec = FeatureSpec.from_dict(SPEC)
    model = BigTables().eval()
    table_bytes = model.user_emb.weight.numel() * 4
    assert table_bytes > 2 << 30
    rows, rid = sample_requests(spec, 10, 50, seed=7)  # held-out requests
    with torch.no_grad():
        eager = model(**to_torch_inputs(spec, rows)).numpy()
    label = (np.random.default_rng(0).random(len(eager)) < eager).astype(np.int64)
    out = tmp_path / "big"
    export_bundle(LoadedModel(spec=spec, module=model), out,
                  ExportOptions(split=False, data={**rows, "label": label, "request_id": rid}))
    m = json.loads((out / "manifest.json").read_text())
    assert [t["name"] for t in m["embeddings"]["tables"]] == ["user_emb.weight"]
    assert m["parity"]["passed"]  # store path vs the eager model on the held-out rows
    assert m["files"]["embeddings.safetensors"]["bytes"] > table_bytes
    assert all(m["files"][st["file"]]["bytes"] < 1 << 20 for st in m["stages"].values())  # graphs stay small
    assert main(["check", str(out), "--bundle-only"]) == 0

    with ServerThread(build_app([out])) as srv:  # serve: a real HTTP server and client
        client = triton.InferenceServerClient(f"127.0.0.1:{srv.port}")
        got = []
        for r in range(10):
            idx = rid == r
            user = {s.name: rows[s.name][idx][:1] for s in spec.user_inputs}
            cands = {s.name: rows[s.name][idx] for s in spec.group_inputs}
            got.append(triton_scores(client, spec.name, user, cands, binary=True))
    assert np.abs(np.concatenate(got) - eager).max() < 1e-6
    del model

    # a fresh process (no torch): load + 50 requests; the 2.15 GiB table is mapped, not read
    proc = subprocess.run([sys.executable, "-c", _vm_rss_mib_script(str(out))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not info["torch"]
    assert info["rss_mib"] < 0.15 * table_bytes / 2**20, info  # far below 2.15 GiB (~330 MiB)
