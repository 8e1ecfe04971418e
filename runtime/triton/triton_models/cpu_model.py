"""ugsep CPU model for Triton's Python backend (written by ``ugsep triton``).

Runs the ugsep runtime (vendored in ./ugsep) on the bundle copied to ./bundle, with
ONNX Runtime on the CPU. Triton's dynamic batcher hands ``execute`` the rankings of
concurrent requests; they are scored by ``runtime.serving.batcher.run_batch``: the
distinct users that miss the user cache go through the user graph in ONE call, and
all candidates through the group graph in ONE call (``user_index`` maps them back).
Parameters (config.pbtxt): user_cache_bytes, user_cache_ttl_s, intra_op_threads,
allow_unverified, embeddings (a redis:// URL: the store's rows come from that Redis
Cluster, pinned to the bundle's store version; needs redis-py in Triton's Python env),
embeddings_cache_bytes.
"""

from __future__ import annotations

import os
import sys

# The ugsep runtime is vendored next to this file: only numpy + onnxruntime are needed.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ugsep"))

from runtime.triton.triton_models import _common  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        here = _common.version_dir(args)
        params = _common.parameters(args)
        import runtime
        from runtime.serving.batcher import run_batch
        from runtime.serving.cache import UserCache

        self.scorer = runtime.load(
            here / "bundle",
            "onnxruntime",
            allow_unverified=params.get("allow_unverified") == "true",
            intra_op_threads=int(params.get("intra_op_threads") or 0) or None,
            embeddings=params.get("embeddings") or None,
            embeddings_cache_bytes=int(params.get("embeddings_cache_bytes") or 0),
        )
        self.cache = UserCache(
            int(params.get("user_cache_bytes") or 0), float(params.get("user_cache_ttl_s") or 300)
        )
        self.max_batch_candidates = int(params.get("max_batch_candidates") or 8192)
        self._run_batch = run_batch
        self.metrics = _common.RuntimeMetrics(args["model_name"])

    def execute(self, requests):
        return _common.execute_rankings(
            requests,
            self.scorer.spec,
            self.scorer.max_candidates,
            self._run,
            list(self.scorer.spec.outputs),
            self.max_batch_candidates,
        )

    def _run(self, prepared):
        outputs, info = self._run_batch(self.scorer, self.cache, prepared)
        self.metrics.observe(info, self.cache)
        return outputs

    def finalize(self):
        self.metrics.close()
        self.cache.clear()
