"""The GPU repository: stage graphs as Triton models, orchestrated per request by BLS.

    <name>_user    user.onnx  (onnxruntime backend) or user.plan  (tensorrt_plan)
    <name>_group   group.onnx (onnxruntime backend) or group.plan (tensorrt_plan)
    <name>         Python-backend BLS model: the clients' entry point

Why BLS and not an ensemble: an ensemble wires tensors between steps but cannot
compute anything, so ``user_index`` would have to come from the client, each request
would run its own user call (M = 1), and the user cache could not be consulted. The
BLS model receives Triton's dynamic batch of rankings, deduplicates users, looks them
up in the user cache, sends only the misses to ``<name>_user`` in ONE call, builds
``user_index``, and sends every candidate to ``<name>_group`` in ONE call — so the
split's saving (U once per user, not once per candidate) and the cache both hold
across requests. It does so by handing ``runtime.serving.batcher.run_batch`` a
scorer whose user/group runs are BLS calls, the same code the HTTP server runs.

A bundle with an embedding store (docs/embedding-store.md): the stage models take the
looked-up vectors as inputs (their graphs have no tables); the orchestrator carries the
store file and does the lookups with ``runtime.embstore.StoreFeeds``, as ``ugsep serve``
does; the tables never reach the GPU models.

Stage models take ``max_batch_size: 0`` with explicit ``-1`` dims: group inputs have
N rows and boundary tensors M rows, which Triton's single batch dimension cannot
express. A bundle without a split gets ``<name>_full`` (full.onnx) instead.

``stage_backend="python"`` serves the stage graphs with ONNX Runtime inside the
Python backend instead: the same topology on a Triton build without the onnxruntime
backend (this is how it is exercised on CPU-only machines).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from runtime.backends.ort import capped_threads
from runtime.bundle import Bundle
from runtime.errors import BundleError
from runtime.manifest import Engine
from runtime.triton._common import (
    VERSION,
    RepositoryOptions,
    batching_config,
    parameters,
    python_model,
    ranking_io,
    stage_io,
    tensor,
)
from runtime.triton.config import Enum, write_config

STAGE_BACKENDS = ("auto", "onnxruntime", "tensorrt_plan", "python")


def write_gpu_models(bundle: Bundle, root: Path, name: str, opts: RepositoryOptions) -> list[str]:
    """Write the stage models and the BLS orchestrator; returns model names (entry first)."""
    backend = pick_stage_backend(bundle, opts.stage_backend)
    stages = ("user", "group") if bundle.manifest.is_split else ("full",)
    described = {}
    for stage in stages:
        described[stage] = write_stage_model(bundle, root, f"{name}_{stage}", stage, backend, opts)
    write_orchestrator(bundle, root, name, described, opts)
    return [name, *(f"{name}_{s}" for s in stages)]


def pick_stage_backend(bundle: Bundle, requested: str) -> str:
    """``auto``: TensorRT plans when the bundle carries engines, else ONNX Runtime."""
    if requested not in STAGE_BACKENDS:
        raise BundleError(f"stage backend '{requested}' is not one of {', '.join(STAGE_BACKENDS)}")
    if requested == "auto":
        return "tensorrt_plan" if bundle.manifest.engines else "onnxruntime"
    if requested == "tensorrt_plan" and not bundle.manifest.engines:
        raise BundleError(
            f"bundle '{bundle.root}' has no TensorRT engines; build them first or use "
            "stage backend 'onnxruntime'"
        )
    return requested


def write_stage_model(
    bundle: Bundle, root: Path, model: str, stage: str, backend: str, opts: RepositoryOptions
) -> dict:
    """One stage graph as a Triton model; returns {"model", "inputs", "outputs"} names."""
    ins, outs = stage_io(bundle, stage)
    cfg = {
        "max_batch_size": 0,  # N-row and M-row tensors side by side: no shared batch dim
        "input": [tensor(i["name"], i["dtype"], i["dims"]) for i in ins],
        "output": [tensor(o["name"], o["dtype"], o["dims"]) for o in outs],
    }
    described = {
        "model": model,
        "inputs": [i["name"] for i in ins],
        "outputs": [o["name"] for o in outs],
    }
    if backend == "python":
        cfg["instance_group"] = [{"kind": Enum("KIND_CPU"), "count": int(opts.instances)}]
        # a stage timed faster on fewer threads at export keeps its cap (exporter/steps/threads.py)
        threads = capped_threads(int(opts.intra_op_threads), bundle.manifest.stage_threads(stage))
        cfg["parameters"] = parameters({"intra_op_threads": int(threads)})
        vdir = python_model(root, model, "onnx_model.py", cfg)
        shutil.copyfile(bundle.stage_path(stage), vdir / "model.onnx")
        return described
    cfg["instance_group"] = [{"kind": Enum("KIND_GPU"), "count": int(opts.instances)}]
    vdir = root / model / VERSION
    vdir.mkdir(parents=True)
    if backend == "onnxruntime":
        cfg = {"backend": "onnxruntime", "default_model_filename": "model.onnx", **cfg}
        shutil.copyfile(bundle.stage_path(stage), vdir / "model.onnx")
    else:
        cfg = {
            "backend": "tensorrt",
            "platform": "tensorrt_plan",
            **cfg,
            **_plans(bundle, stage, vdir, opts.trt_version),
        }
    write_config(root / model, {"name": model, **cfg})
    return described


def _plans(bundle: Bundle, stage: str, vdir: Path, trt_version: str | None) -> dict:
    """Copy every engine of ``stage``; Triton picks the one for the GPU's compute capability.

    An engine only loads on the TensorRT version it was built with: the Triton image's
    TensorRT must match the ``trt_version`` recorded in the manifest (``trt_version``
    keeps only those engines, and must when one GPU has engines for several versions).
    """
    cc_files: dict[str, str] = {}
    for eng in _engines(bundle, trt_version):
        cc = eng.compute_capability or ""
        src = bundle.root / eng.dir / f"{stage}.plan"
        if not cc or not src.is_file():
            raise BundleError(
                f"bundle '{bundle.root}': engine entry {eng.dir!r} has no compute capability "
                f"or no '{stage}.plan'"
            )
        if cc in cc_files:
            raise BundleError(
                f"bundle '{bundle.root}' has several engines for compute capability {cc} "
                "(different TensorRT versions); pick the Triton image's with trt_version "
                "(CLI: --trt-version)"
            )
        cc_files[cc] = f"{stage}_sm{cc.replace('.', '')}.plan"
        shutil.copyfile(src, vdir / cc_files[cc])
    return {
        "default_model_filename": next(iter(cc_files.values())),
        "cc_model_filenames": [{"key": k, "value": v} for k, v in cc_files.items()],
    }


def _engines(bundle: Bundle, trt_version: str | None) -> list[Engine]:
    engines = bundle.manifest.engines
    if trt_version is None:
        return engines
    kept = [e for e in engines if e.trt_version == trt_version]
    if not kept:
        found = sorted({str(e.trt_version) for e in engines})
        raise BundleError(
            f"bundle '{bundle.root}' has no TensorRT engines for TensorRT {trt_version} "
            f"(it has engines for: {', '.join(found)})"
        )
    return kept


def write_orchestrator(
    bundle: Bundle, root: Path, name: str, stages: dict[str, dict], opts: RepositoryOptions
) -> None:
    """The clients' entry model: Python-backend BLS over the stage models."""
    inputs, outputs = ranking_io(bundle)
    cfg = {
        **batching_config(bundle, opts),
        "input": inputs,
        "output": outputs,
        "instance_group": [{"kind": Enum("KIND_CPU"), "count": int(opts.instances)}],
        "parameters": parameters(
            {
                "stages": json.dumps(stages, sort_keys=True),
                "user_cache_bytes": int(opts.user_cache_bytes),
                "user_cache_ttl_s": float(opts.user_cache_ttl_s),
                "max_batch_candidates": int(opts.max_batch_candidates),
            }
        ),
    }
    vdir = python_model(root, name, "bls_model.py", cfg)
    # The orchestrator needs the spec, limits and split layout, not the graphs; with an
    # embedding store also the store file: it looks the rows up before each stage call.
    (vdir / "bundle").mkdir()
    shutil.copyfile(bundle.root / "manifest.json", vdir / "bundle" / "manifest.json")
    store = bundle.manifest.embeddings
    if store and store.lookups:
        shutil.copyfile(bundle.path(store.file), vdir / "bundle" / store.file)
