"""Every student captures with a dynamic batch and runs in ONNX Runtime like eager (<= 1e-5)."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils import _pytree as pytree

from students.base import model_inputs
from students.data import make_dataset
from students.zoo import KINDS, build_student

torch.set_num_threads(1)
BATCHES = [1, 2, 7, 1000]


@pytest.fixture(scope="module")
def heldout():
    _, _, held = make_dataset("tiny", n_train=10, n_requests=20, candidates=50, seed=11)
    return held  # 1,000 rows


def _dynamic_shapes(kwargs, batch):
    return {
        k: ({kk: {0: batch} for kk in v} if isinstance(v, dict) else {0: batch})
        for k, v in kwargs.items()
    }


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request, heldout):
    """(kind, eager model, exported program, ORT session) for one trained-looking student."""
    torch.manual_seed(0)
    model = build_student(request.param, "tiny").eval()
    with torch.no_grad():  # move weights off their init so the check is not about zeros
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kwargs = model_inputs(model, heldout, slice(0, 3))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    ep = torch.export.export(
        model, (), kwargs, dynamic_shapes=_dynamic_shapes(kwargs, batch), strict=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            ep, (), dynamo=True, opset_version=18, optimize=True, verbose=False
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(
        onnx_program.model_proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return request.param, model, ep, session


def _ort_feed(session, kwargs):
    leaves = [t.numpy() for t in pytree.tree_leaves(kwargs)]  # the order export flattens in
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(leaves)
    return dict(zip(names, leaves, strict=True))


def test_exported_program_has_a_symbolic_batch(exported, heldout):
    _, model, ep, _ = exported
    placeholders = [
        n
        for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs
    ]
    assert placeholders, "no user inputs in the exported program"
    for node in placeholders:
        assert not isinstance(node.meta["val"].shape[0], int), (
            f"{node.name}: batch dim was specialised"
        )
    kwargs = model_inputs(model, heldout, slice(0, 7))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(**kwargs), model(**kwargs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", BATCHES)
def test_onnx_matches_eager(exported, heldout, batch):
    _, model, _, session = exported
    kwargs = model_inputs(model, heldout, slice(0, batch))
    with torch.no_grad():
        eager = model(**kwargs).numpy()
    (onnx_out,) = session.run(None, _ort_feed(session, kwargs))
    assert onnx_out.shape == (batch,)
    assert np.abs(onnx_out - eager).max() <= 1e-5
