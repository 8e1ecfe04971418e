"""ugsep orchestrator for a GPU repository: Python-backend BLS (written by ``ugsep triton``).

Triton's dynamic batcher hands ``execute`` the rankings of concurrent requests. They
are scored by ``runtime.serving.batcher.run_batch`` with a scorer whose graph runs are
BLS calls: distinct users that miss the user cache -> ONE call to ``<name>_user``
(M rows), all candidates -> ONE call to ``<name>_group`` with ``user_index``. A bundle
with an embedding store has its store file beside the manifest (``bundle/``): the rows
are looked up here, on the CPU, before each stage call (user ids once per user,
candidate ids once per candidate), and the stage models take the looked-up vectors.
Parameters (config.pbtxt): stages (JSON), user_cache_bytes, user_cache_ttl_s.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ugsep"))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from runtime.triton.triton_models import _common  # noqa: E402


class BlsStages:
    """What ``run_batch`` needs from a Scorer, with each graph run as a BLS call."""

    def __init__(self, manifest, stages: dict, store=None) -> None:
        self.manifest, self.spec, self.stages = manifest, manifest.spec, stages
        self.store = store  # runtime.embstore.StoreFeeds of the bundle's store, or None
        self.split = "user" in stages and "group" in stages
        # a request-scoped bundle: one group (or full) call per request (runtime.scorer)
        self.request_scoped = manifest.mixes_rows("group" if self.split else "full")
        self.boundary_names = [b.name for b in manifest.split.boundary] if self.split else []
        self.output_names = list(self.spec.outputs)
        self.max_candidates = manifest.limits.max_candidates

    def lookup(self, inputs, side):
        """``inputs`` plus the store's rows for the lookups of ``side`` (no store: unchanged)."""
        return inputs if self.store is None else self.store.feeds(inputs, side)

    def run_user(self, users):
        return self._call("user", self.lookup(users, "user"), self.boundary_names)

    def run_group(self, cands, boundary, user_index):
        cands = self.lookup(cands, "group")
        feeds = {**cands, **boundary, "user_index": np.asarray(user_index, dtype=np.int64)}
        return self._call("group", feeds, self.output_names)

    def run_full(self, users, cands, user_index):
        users = self.lookup(users, "user")  # once per user, then gathered per candidate
        feeds = {k: v[user_index] for k, v in users.items()}
        feeds.update(self.lookup(cands, "group"))  # mixed inputs come whole from the candidates
        return self._call("full", feeds, self.output_names)

    def run_per_request(self, prepared, boundary, slots=None):
        from runtime.scorer import run_per_request

        return run_per_request(self, prepared, boundary, slots)

    def _call(self, stage, feeds, names):
        st = self.stages[stage]
        kwargs = {}
        if hasattr(pb_utils, "PreferredMemory"):  # outputs to host memory: the cache is numpy
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(
                pb_utils.TRITONSERVER_MEMORY_CPU, 0
            )
        request = pb_utils.InferenceRequest(
            model_name=st["model"],
            requested_output_names=list(names),
            inputs=[pb_utils.Tensor(n, np.ascontiguousarray(feeds[n])) for n in st["inputs"]],
            **kwargs,
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"model '{st['model']}' failed: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in names}


class TritonPythonModel:
    def initialize(self, args):
        here = _common.version_dir(args)
        params = _common.parameters(args)
        from runtime.embstore import StoreFeeds
        from runtime.manifest import Manifest
        from runtime.serving.batcher import run_batch
        from runtime.serving.cache import UserCache

        manifest = Manifest.read(here / "bundle")
        store = StoreFeeds.for_directory(here / "bundle", manifest)  # None: no store
        self.stages = BlsStages(manifest, json.loads(params["stages"]), store)
        self.cache = UserCache(
            int(params.get("user_cache_bytes") or 0), float(params.get("user_cache_ttl_s") or 300)
        )
        self.max_batch_candidates = int(params.get("max_batch_candidates") or 8192)
        self._run_batch = run_batch
        self.metrics = _common.RuntimeMetrics(args["model_name"])

    def execute(self, requests):
        return _common.execute_rankings(
            requests,
            self.stages.spec,
            self.stages.max_candidates,
            self._run,
            self.stages.output_names,
            self.max_batch_candidates,
        )

    def _run(self, prepared):
        outputs, info = self._run_batch(self.stages, self.cache, prepared)
        self.metrics.observe(info, self.cache)
        return outputs

    def finalize(self):
        self.metrics.close()
        self.cache.clear()
