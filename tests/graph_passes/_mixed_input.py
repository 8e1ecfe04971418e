"""Shared by the mixed-input split tests: capture a model on one 2-D input ``X``, and score a
split's ONNX graphs on sampled requests the way the runtime does (user graph once per
request's first row, group graph on every row), to compare with eager."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from runtime.sample import sample_requests


def capture_x(model, spec):
    """torch.export of ``model(X=...)`` with a dynamic batch, on rows sampled from ``spec``."""
    x = torch.from_numpy(sample_requests(spec, 2, 2, seed=0)[0]["X"])
    b = torch.export.Dim("batch", min=1, max=1 << 20)
    return torch.export.export(model, (), {"X": x}, dynamic_shapes={"X": {0: b}}, strict=False)


def split_vs_eager_max_abs(art, model, spec, requests: int, candidates: int, seed: int) -> float:
    """Max |split graphs - eager| over ``requests`` sampled requests of ``candidates`` rows."""
    opts = {"providers": ["CPUExecutionProvider"]}
    user = ort.InferenceSession(str(art.paths["user"]), **opts)
    group = ort.InferenceSession(str(art.paths["group"]), **opts)
    rows, rid = sample_requests(spec, requests, candidates, seed=seed)
    firsts = np.unique(rid, return_index=True)[1]
    names = [o.name for o in user.get_outputs()]
    boundary = dict(zip(names, user.run(None, {"X": rows["X"][firsts]}), strict=True))
    feeds = {"X": rows["X"], **boundary, "user_index": rid}
    got = group.run(None, {i.name: feeds[i.name] for i in group.get_inputs()})[0].reshape(-1)
    with torch.no_grad():
        ref = model(torch.from_numpy(rows["X"])).numpy()
    return float(np.abs(got - ref).max())
