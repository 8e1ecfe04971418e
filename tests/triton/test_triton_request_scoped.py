"""A request-scoped bundle (listwise softmax over the request's candidates) through the
Triton BLS repository: concurrent requests are batched by Triton, yet every request gets
the eager model's scores for its own candidates (one group call per request)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.triton import write_repository
from runtime.triton.server import TritonServer
from tests.test_row_scope import Listwise, eager_request, make, request, spec_named
from tests.triton.conftest import triton_inputs


@pytest.fixture(scope="module")
def listwise_bundle(tmp_path_factory):
    from exporter import ExportOptions, export_bundle
    from exporter.load import LoadedModel

    torch.set_num_threads(1)
    model = make(Listwise)
    out = tmp_path_factory.mktemp("tri_listwise") / "listwise"
    ctx = export_bundle(
        LoadedModel(spec_named("listwise"), module=model),
        out,
        ExportOptions(max_candidates=64, parity_rows=200),
    )
    assert ctx.parity_report.passed, ctx.parity_report.failed_stages
    return out, model


@pytest.mark.triton
@pytest.mark.slow
def test_listwise_bundle_through_bls_equals_eager_per_request(
    listwise_bundle, triton_env, tmp_path
):
    import json

    import tritonclient.http as th

    path, model = listwise_bundle
    assert json.loads((path / "manifest.json").read_text())["row_scope"]["group"] == "request"
    repo = write_repository(
        path, tmp_path / "repo", "gpu", stage_backend="python", max_queue_delay_us=30_000
    )
    reqs = [request(200 + i, 8, user_seed=i % 3) for i in range(12)]  # same N: Triton batches
    with TritonServer(repo.root, triton_env) as server:
        client = th.InferenceServerClient(server.http_url, concurrency=12)
        try:
            outs = [th.InferRequestedOutput("score", binary_data=True)]
            pending = [
                client.async_infer("listwise", triton_inputs([r], True), outputs=outs)
                for r in reqs
            ]
            got = [p.get_result().as_numpy("score")[0] for p in pending]
            group_stats = client.get_inference_statistics("listwise_group")["model_stats"][0]
        finally:
            client.close()
    for (u, c), scores in zip(reqs, got, strict=True):
        np.testing.assert_allclose(scores, eager_request(model, u, c), rtol=1e-5, atol=1e-6)
        assert abs(float(scores.sum()) - 1.0) < 1e-5  # a distribution over this request alone
    assert group_stats["execution_count"] == len(reqs), group_stats  # never merged
