"""Pieces both Triton repository kinds use: options, tensor and I/O descriptions, model folders.

``repository`` (the CPU kind and the entry point) and ``gpu`` (stage models + BLS) import
from here; neither imports the other's internals.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from runtime.bundle import Bundle
from runtime.errors import BundleError
from runtime.spec import InputSpec
from runtime.triton.config import DTYPES, Enum, write_config

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
    embeddings: str | None = None  # cpu: look the store's rows up in this Redis Cluster (redis://…)
    embeddings_cache_bytes: int = 64 << 20  # cpu + embeddings: hot-row cache per model instance
    overwrite: bool = False
    verify: object = None  # a key (runtime/signing.py) the bundle must be signed with
    allow_extra_files: bool = False  # ignore (and do not copy) files the manifest does not list


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
        "max_batch_size": bundle.manifest.limits.max_users_per_call,
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
        shutil.copytree(bundle_src, vdir / "bundle", ignore=_unlisted_files(bundle_src))
    return vdir


def _unlisted_files(bundle_root: Path):
    """A copytree ``ignore`` keeping only the manifest, its signature and the files it lists
    (the copy is loaded, and checked, again inside Triton)."""
    from runtime.bundle_checks import KNOWN_UNLISTED
    from runtime.manifest import Manifest

    root = Path(bundle_root)
    keep = set(Manifest.read(root).files) | KNOWN_UNLISTED
    keep_dirs = {p.as_posix() for rel in keep for p in Path(rel).parents}

    def ignore(directory: str, names: list[str]) -> list[str]:
        rel = Path(directory).relative_to(root)
        return [n for n in names if (rel / n).as_posix() not in keep | keep_dirs]

    return ignore
