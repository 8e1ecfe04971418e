"""Write a Triton Inference Server model repository for a ugsep bundle.

    write_repository("bundle/", "repo/", kind="cpu")   # one Python-backend model
    write_repository("bundle/", "repo/", kind="gpu")   # ORT/TensorRT stage models + BLS

Both kinds expose ONE top-level model, named after the bundle, with the same wire
format (see ``runtime.triton.batch``): user inputs [B, *shape], candidate inputs
[B, N, *shape], outputs [B, N, ...], where Triton's batch dimension B counts rankings
(one user and its N candidates; usually 1 per request).

Why batch over rankings, not candidates: a request is one user plus N candidates, so
its user and candidate tensors have different leading sizes (1 vs N) and cannot share
Triton's batch dimension. Making the batch dimension "rankings" lets Triton's own
dynamic batcher merge concurrent requests (``max_batch_size`` = the bundle's
``max_users_per_call``), with ``allow_ragged_batch`` on candidate inputs so requests
with different N are merged too. The model then scores all merged rankings with one
user call (M users) and one group call (all candidates) — the split's saving and the
batcher's saving together. (``max_batch_size: 0`` would forgo Triton's batcher and
leave every request to run its own user and group calls.)

Every ``config.pbtxt`` is validated against Triton's ModelConfig schema before it is
written (``runtime.triton.config``). The ugsep runtime is vendored into each
Python-backend model (``<version>/ugsep/runtime``), so Triton's Python environment
needs only numpy and onnxruntime.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from runtime.bundle import Bundle
from runtime.errors import BundleError
from runtime.triton._common import (  # noqa: F401 - re-exported: the repository's public pieces
    RUNTIME_DIR,
    TEMPLATES,
    VERSION,
    RepositoryOptions,
    batching_config,
    parameters,
    python_model,
    ranking_io,
    spec_dims,
    stage_io,
    tensor,
    vendor_runtime,
)
from runtime.triton.config import Enum
from runtime.triton.gpu import write_gpu_models

log = logging.getLogger(__name__)
KINDS = ("cpu", "gpu")
@dataclass
class Repository:
    """What was written: the repository root and its models (top-level model first)."""

    root: Path
    kind: str
    model_name: str
    models: list[str] = field(default_factory=list)


def write_repository(
    bundle_dir: str | Path,
    out_dir: str | Path,
    kind: str = "cpu",
    options: RepositoryOptions | None = None,
    **overrides,
) -> Repository:
    """Write the Triton model(s) for ``bundle_dir`` into the repository ``out_dir``.

    ``out_dir`` may already hold other models; ours are staged in a temporary folder
    and moved in only when every config validated. Existing models of the same name
    are replaced only with ``overwrite``.
    """
    if kind not in KINDS:
        raise BundleError(f"repository kind '{kind}' is not one of {', '.join(KINDS)}")
    opts = dataclasses.replace(options or RepositoryOptions(), **overrides)  # TypeError if unknown
    if opts.embeddings and kind != "cpu":
        raise BundleError("--embeddings (a Redis tier) is supported for --kind cpu only")
    bundle = Bundle.open(bundle_dir, key=opts.verify, allow_extra_files=opts.allow_extra_files)
    bundle.check_parity(allow_unverified=opts.allow_unverified)
    name = model_name(opts.model_name or bundle.manifest.model_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ugsep-triton-", dir=out) as tmp:
        stage = Path(tmp)
        if kind == "cpu":
            models = [write_cpu_model(bundle, stage, name, opts)]
        else:
            models = write_gpu_models(bundle, stage, name, opts)
        _move_models(stage, out, models, opts.overwrite)
    log.info("wrote Triton %s repository for '%s' to %s: %s", kind, name, out, ", ".join(models))
    return Repository(root=out, kind=kind, model_name=name, models=models)


def model_name(raw: str) -> str:
    """A Triton-safe model (directory) name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", raw).strip(".")
    if not name:
        raise BundleError(f"cannot make a Triton model name from {raw!r}")
    return name


def _move_models(stage: Path, out: Path, models: list[str], overwrite: bool) -> None:
    clash = [m for m in models if (out / m).exists()]
    if clash and not overwrite:
        raise BundleError(
            f"repository '{out}' already has model(s) {clash}; pass overwrite=True "
            "(CLI: --overwrite) to replace them"
        )
    for m in models:
        if (out / m).exists():
            shutil.rmtree(out / m)
        shutil.move(str(stage / m), str(out / m))


# -- the CPU repository ------------------------------------------------------------------
def write_cpu_model(bundle: Bundle, root: Path, name: str, opts: RepositoryOptions) -> str:
    """One Python-backend model running the ugsep runtime (split + user cache) on ORT CPU."""
    inputs, outputs = ranking_io(bundle)
    cfg = {
        **batching_config(bundle, opts),
        "input": inputs,
        "output": outputs,
        "instance_group": [{"kind": Enum("KIND_CPU"), "count": int(opts.instances)}],
        "parameters": parameters(
            {
                "user_cache_bytes": int(opts.user_cache_bytes),
                "user_cache_ttl_s": float(opts.user_cache_ttl_s),
                "intra_op_threads": int(opts.intra_op_threads),
                "allow_unverified": "true" if opts.allow_unverified else "false",
                "embeddings": opts.embeddings or "",
                "embeddings_cache_bytes": int(opts.embeddings_cache_bytes),
            }
        ),
    }
    python_model(root, name, "cpu_model.py", cfg, bundle_src=bundle.root)
    return name
