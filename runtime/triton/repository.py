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
from runtime.spec import InputSpec
from runtime.triton.config import DTYPES, Enum, write_config

log = logging.getLogger(__name__)
KINDS = ("cpu", "gpu")
RUNTIME_DIR = Path(__file__).resolve().parents[1]  # the `runtime` package, vendored as is
TEMPLATES = Path(__file__).resolve().parent / "triton_models"
VERSION = "1"


@dataclass
class RepositoryOptions:
    """Knobs of the generated repository (CLI flags map one to one)."""

    model_name: str | None = None  # default: the bundle's model name
    instances: int = 1  # instance_group count of each model
    max_queue_delay_us: int = 500  # Triton dynamic batcher delay
    user_cache_bytes: int = 64 << 20  # per model instance; 0 disables the user cache
    user_cache_ttl_s: float = 300.0
    max_batch_candidates: int = 8192  # candidates per group call; larger batches are chunked
    intra_op_threads: int = 0  # ONNX Runtime threads in the CPU model (0: ORT default)
    allow_unverified: bool = False  # serve a bundle with no/failed parity record
    stage_backend: str = "auto"  # gpu: auto | onnxruntime | tensorrt_plan | python
    trt_version: str | None = None  # gpu + engines: only engines built by this TensorRT version
    overwrite: bool = False


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
    bundle = Bundle.open(bundle_dir)
    bundle.check_parity(allow_unverified=opts.allow_unverified)
    name = model_name(opts.model_name or bundle.manifest.model_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ugsep-triton-", dir=out) as tmp:
        stage = Path(tmp)
        if kind == "cpu":
            models = [write_cpu_model(bundle, stage, name, opts)]
        else:
            from runtime.triton.gpu import write_gpu_models

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


# -- shared pieces ------------------------------------------------------------------------
def spec_dims(s: InputSpec) -> tuple[list[int], dict | None]:
    """Triton dims of a user input per ranking (+ reshape for a scalar per row)."""
    if not s.shape:  # Triton wants >= 1 dim beside the batch dim; the model sees [B]
        return [1], {"shape": []}
    return list(s.shape), None


def tensor(name: str, dtype: str, dims: list[int], **extra) -> dict:
    if dtype not in DTYPES:
        raise BundleError(f"tensor '{name}' has dtype {dtype}, which ugsep cannot map to Triton")
    return {"name": name, "data_type": Enum(DTYPES[dtype]), "dims": dims, **extra}


def ranking_io(bundle: Bundle) -> tuple[list[dict], list[dict]]:
    """Inputs/outputs of the top-level model in the ranking wire format."""
    spec = bundle.manifest.spec
    inputs = []
    for s in spec.user_inputs:
        dims, reshape = spec_dims(s)
        inputs.append(tensor(s.name, s.dtype, dims, **({"reshape": reshape} if reshape else {})))
    for s in spec.group_inputs:
        inputs.append(tensor(s.name, s.dtype, [-1, *s.shape], allow_ragged_batch=True))
    outs = stage_io(bundle, "group" if bundle.manifest.is_split else "full")[1]
    outputs = [
        tensor(o["name"], o["dtype"], [-1, *o["dims"][1:]])
        for o in outs
        if o["name"] in spec.outputs
    ]
    return inputs, outputs


def stage_io(bundle: Bundle, stage: str) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and dims (-1 for symbolic) of a stage graph, read with ONNX Runtime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle.stage_path(stage)), providers=["CPUExecutionProvider"])

    def describe(values) -> list[dict]:
        return [
            {
                "name": v.name,
                "dtype": _ort_dtype(v.type, v.name),
                "dims": [d if isinstance(d, int) and d > 0 else -1 for d in v.shape],
            }
            for v in values
        ]

    return describe(sess.get_inputs()), describe(sess.get_outputs())


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


def _ort_dtype(ort_type: str, name: str) -> str:
    if ort_type not in _ORT_TYPES:
        raise BundleError(
            f"graph tensor '{name}' has type {ort_type}, which ugsep cannot map to Triton"
        )
    return _ORT_TYPES[ort_type]


def batching_config(bundle: Bundle, opts: RepositoryOptions) -> dict:
    """Triton's dynamic batcher over rankings, bounded by the bundle's limits."""
    return {
        "max_batch_size": int(bundle.manifest.limits["max_users_per_call"]),
        "dynamic_batching": {"max_queue_delay_microseconds": int(opts.max_queue_delay_us)},
    }


def parameters(values: dict[str, object]) -> list[dict]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def vendor_runtime(version_dir: Path) -> None:
    """Copy the ugsep runtime package (sources only) into ``version_dir/ugsep/runtime``."""
    shutil.copytree(
        RUNTIME_DIR,
        version_dir / "ugsep" / "runtime",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"),
    )


def python_model(
    root: Path, name: str, template: str, cfg: dict, *, bundle_src: Path | None = None
) -> Path:
    """A Python-backend model folder: config.pbtxt, model.py, vendored runtime, bundle."""
    vdir = root / name / VERSION
    vdir.mkdir(parents=True)
    write_config(root / name, {"name": name, "backend": "python", **cfg})
    shutil.copyfile(TEMPLATES / template, vdir / "model.py")
    vendor_runtime(vdir)
    if bundle_src is not None:
        shutil.copytree(bundle_src, vdir / "bundle")
    return vdir


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
            }
        ),
    }
    python_model(root, name, "cpu_model.py", cfg, bundle_src=bundle.root)
    return name
