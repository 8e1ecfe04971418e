"""``config.pbtxt``: rendered from plain data, validated against Triton's own schema.

A model configuration is built as a dict (enum values wrapped in ``Enum``), rendered
to protobuf text format, and parsed back with ``google.protobuf.text_format`` into
Triton's ``inference.ModelConfig`` message — the ``model_config.proto`` that the
Triton client package ships (``tritonclient.grpc.model_config_pb2``). A field name,
enum value or type the schema does not know fails here, at write time, with the file
named, instead of at model load on a fleet. A few rules the schema cannot express
(unique tensor names, dynamic batching needs batching) are checked as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime.errors import BundleError

DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "bool": "TYPE_BOOL",
}


class Enum(str):
    """An enum value: rendered bare (``TYPE_FP32``), not quoted."""


class TritonConfigError(BundleError):
    """A generated config.pbtxt does not satisfy Triton's model-configuration schema."""


def model_config_pb2():
    """Triton's ModelConfig protobuf module, from the Triton client package."""
    try:
        from tritonclient.grpc import model_config_pb2 as pb
    except ImportError as e:
        raise TritonConfigError(
            "cannot validate config.pbtxt: Triton's schema (tritonclient.grpc.model_config_pb2) "
            f"is not importable ({e}); install tritonclient[grpc] (ugsep[triton])"
        ) from e
    return pb


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid text-format string
    raise TypeError(f"cannot render {type(value).__name__} {value!r} in a config.pbtxt")


def render(cfg: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format for a nested dict (lists of dicts become repeated messages)."""
    pad = "  " * indent
    lines = []
    for key, value in cfg.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", render(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines += [f"{pad}{key} {{", render(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


def parse(text: str, where: str = "config.pbtxt"):
    """Parse config text into Triton's ModelConfig message, or raise TritonConfigError."""
    from google.protobuf import text_format

    pb = model_config_pb2()
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as e:
        raise TritonConfigError(f"{where} does not match Triton's ModelConfig schema: {e}") from e


def check(config, where: str = "config.pbtxt") -> None:
    """Rules beyond the proto schema that tritonserver enforces at load time."""
    problems = []
    if not config.name:
        problems.append("the model has no name")
    if not (config.backend or config.platform):
        problems.append("neither 'backend' nor 'platform' is set")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            problems.append(f"{kind} names repeat: {names}")
        for t in tensors:
            if t.data_type == 0:  # TYPE_INVALID
                problems.append(f"{kind} '{t.name}' has no data_type")
            if any(d < -1 or d == 0 for d in t.dims):
                problems.append(
                    f"{kind} '{t.name}' has dims {list(t.dims)} (each must be -1 or > 0)"
                )
    if config.max_batch_size < 0:
        problems.append(f"max_batch_size is {config.max_batch_size}")
    if config.HasField("dynamic_batching") and config.max_batch_size == 0:
        problems.append("dynamic_batching needs max_batch_size > 0")
    if problems:
        raise TritonConfigError(f"{where} is not a loadable Triton config: " + "; ".join(problems))


def write_config(model_dir: str | Path, cfg: dict[str, Any]) -> Path:
    """Render, validate against Triton's schema, then write ``model_dir/config.pbtxt``."""
    path = Path(model_dir) / "config.pbtxt"
    text = render(cfg) + "\n"
    check(parse(text, str(path)), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def validate_file(path: str | Path):
    """Parse and check an existing config.pbtxt; returns the ModelConfig message."""
    path = Path(path)
    config = parse(path.read_text(), str(path))
    check(config, str(path))
    return config
