"""Triton's model configuration for a served model (``/v2/models/{m}/config``, gRPC ``ModelConfig``).

The fields a Triton client or tool reads (``get_model_config``, perf_analyzer):
``name``, ``platform`` / ``backend``, ``max_batch_size``, ``input`` / ``output`` with
``data_type`` and ``dims``, ``dynamic_batching``, ``instance_group``. A ugsep request is
one user ([1, ...] inputs) and N candidates ([N, ...] inputs), so there is no implicit
batch dimension shared by every input: ``max_batch_size`` is 0 and ``dims`` are the
full shapes, -1 marking the candidate dimension (as in the model metadata). The server
still batches across requests (merging their candidates): ``dynamic_batching`` gives
its queue delay and queue bound, ``parameters`` its per-request and per-batch limits.
"""

from __future__ import annotations

from typing import Any

from runtime.serving.repository import ServedModel, ServeOptions


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": f"TYPE_{datatype}", "dims": list(shape)}


def model_config(model: ServedModel, options: ServeOptions) -> dict[str, Any]:
    """The model's configuration as Triton's JSON (``model_config.proto`` field names)."""
    meta = model.metadata()
    backend = model.scorer.backend.name
    return {
        "name": model.name,
        "platform": meta["platform"],
        "backend": backend,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": 0,
        "input": [_tensor(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]],
        "output": [_tensor(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]],
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(options.max_delay_ms * 1000),
            "default_queue_policy": {"max_queue_size": int(options.max_queue)},
        },
        "instance_group": [{"name": f"{model.name}_cpu" if backend == "onnxruntime" else model.name,
                            "count": int(options.workers),
                            "kind": "KIND_CPU" if backend == "onnxruntime" else "KIND_AUTO"}],
        "parameters": {
            k: {"string_value": str(v)} for k, v in {
                "split": model.scorer.split,
                "max_candidates": model.scorer.max_candidates,
                "max_batch_candidates": options.max_batch_candidates,
                "precision": model.scorer.manifest.precision,
                "request_scoped": model.scorer.request_scoped,
            }.items()
        },
    }
