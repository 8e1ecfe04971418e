"""`ugsep triton --kind cpu` with a store bundle: the repository carries the store (the
bundle's runtime does the lookups), scores on a real tritonserver == eager; the gpu kind
refuses it in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter import ExportOptions, LoadedModel, export_bundle
from exporter.steps.capture import to_torch_inputs
from exporter.steps.embeddings import EmbeddingsOptions
from runtime.errors import BundleError
from runtime.sample import sample_requests
from runtime.spec import FeatureSpec
from runtime.triton import write_repository
from runtime.triton.server import TritonServer
from tests.embstore.models import make_toy_lookups, toy_spec
from tests.triton.conftest import triton_scores

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_cpu_repository_serves_a_store_bundle(tmp_path, triton_env):
    spec = FeatureSpec.from_dict(toy_spec())
    model = make_toy_lookups()
    bundle = tmp_path / "b"
    export_bundle(LoadedModel(spec=spec, module=model), bundle,
                  ExportOptions(split=False, parity_rows=200, embeddings=EmbeddingsOptions(min_bytes=4096)))
    with pytest.raises(BundleError, match="use --kind cpu"):
        write_repository(bundle, tmp_path / "gpu", "gpu")
    repo = write_repository(bundle, tmp_path / "repo", "cpu", intra_op_threads=1)
    assert (repo.root / repo.models[0] / "1" / "bundle" / "embeddings.safetensors").is_file()
    rows, rid = sample_requests(spec, 3, 7, seed=2)
    rankings = [({s.name: rows[s.name][rid == r][:1] for s in spec.user_inputs},
                 {s.name: rows[s.name][rid == r] for s in spec.group_inputs}) for r in range(3)]
    import tritonclient.http as th

    with TritonServer(repo.root, triton_env) as server:
        client = th.InferenceServerClient(server.http_url)
        got = triton_scores(client, repo.model_name, rankings, True)
        client.close()
    with torch.no_grad():
        want = model(**to_torch_inputs(spec, rows)).numpy().reshape(3, 7)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
