"""Loading trained students: checkpoint directories, factory + weights, or ``.pt2`` programs.

Weights are read only as safetensors or with ``torch.load(weights_only=True)``: a
pickle carrying code is refused, never executed. A checkpoint directory looks like

    ckpt/
      model.safetensors   the state dict
      config.json         {"factory": "package.module:callable", "kwargs": {...}}
      spec.json           the feature spec (or spec.yaml)

``factory(**kwargs)`` must rebuild the module. ``config.json`` is data: the factory it
names is imported from the installed environment only when its module is trusted and it
is a registered model factory (:mod:`exporter.trust`); otherwise nothing is imported or
run. Nothing is ever imported from the checkpoint directory itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.errors import CheckpointError, ExportError
from exporter.trust import Trust, resolve_factory
from runtime.bundle import sha256_file
from runtime.spec import FeatureSpec

log = logging.getLogger(__name__)
_SPEC_NAMES = ("spec.json", "spec.yaml", "spec.yml")


@dataclass
class LoadedModel:
    """A model ready for capture: an eager module (or an ExportedProgram), its spec, provenance."""

    spec: FeatureSpec
    module: torch.nn.Module | None = None
    program: Any = None  # torch.export.ExportedProgram when loaded from .pt2
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def eager(self) -> torch.nn.Module:
        """A callable eager reference: the module, or the .pt2 program's module."""
        if self.module is not None:
            return self.module
        from exporter.program import ProgramModule

        return ProgramModule(self.program)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from safetensors, or a torch file with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError

        try:
            return LazySafetensors(path)  # tensors are read one at a time, when loaded
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"'{path}' is named .safetensors but is not a valid safetensors file: {e}"
            ) from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is the same user error
        raise CheckpointError(
            f"refused to load '{path}': it is not a plain tensor state dict "
            f"(torch.load with weights_only=True rejected it: {str(e).splitlines()[0]}). "
            "Save weights with safetensors or torch.save(model.state_dict())"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"'{path}' does not hold a state dict of tensors")
    return obj


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}


class LazySafetensors(dict):
    """A safetensors file as a state dict whose tensors are read on access (``shapes`` from
    the header), so loading copies one tensor at a time into the model: peak memory is the
    model plus its largest tensor, not the model plus the whole checkpoint."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(path), framework="pt")
        self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
        super().__init__({k: None for k in self.shapes})

    def copy_into(self, key: str, dest: torch.Tensor) -> None:
        """Read ``key`` from the file straight into ``dest``'s memory when the bytes match
        (same dtype, contiguous): no intermediate tensor, no mapped pages left behind."""
        from runtime.embstore import read_safetensors_header

        if not hasattr(self, "_header"):
            self._header = read_safetensors_header(self.path)
        header, base = self._header
        info = header[key]
        start, end = info["data_offsets"]
        same = _ST_DTYPES.get(info["dtype"]) == dest.dtype and dest.is_contiguous()
        if not same or end - start != dest.numel() * dest.element_size() or dest.numel() == 0:
            dest.copy_(self[key])
            return
        raw = dest.detach().view(-1).view(torch.uint8).numpy()
        with open(self.path, "rb") as f:
            f.seek(base + start)
            got = f.readinto(memoryview(raw))
        if got != end - start:
            raise CheckpointError(f"checkpoint '{self.path}' is truncated (tensor '{key}')")

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` strictly, with an error listing what does not match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_of = state.shapes if isinstance(state, LazySafetensors) else {k: tuple(v.shape) for k, v in state.items()}
    shapes = [
        f"{k}: checkpoint {shape_of[k]} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != shape_of[k]
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append("shape mismatches " + "; ".join(shapes[:5]))
        raise CheckpointError(
            f"checkpoint '{where}' does not fit the model built by its factory: " + ", ".join(parts)
        )
    if not isinstance(state, LazySafetensors):
        module.load_state_dict(state, strict=True)
        return
    with torch.no_grad():  # one tensor at a time (tied weights appear once per name)
        for k, t in own.items():
            state.copy_into(k, t)


def find_spec(directory: Path) -> Path | None:
    for name in _SPEC_NAMES:
        if (directory / name).is_file():
            return directory / name
    return None


def load_student(
    source: str | Path,
    *,
    factory: str | None = None,
    kwargs: dict[str, Any] | None = None,
    spec: str | Path | dict | FeatureSpec | None = None,
    trust: Trust | tuple[str, ...] | list[str] | None = None,
    factory_from: str = "the caller",
) -> LoadedModel:
    """Load a model from a checkpoint directory, a weights file + factory, or a ``.pt2`` file.

    ``trust`` names the modules (beyond the default ``students``) whose registered model
    factories a checkpoint may name (:mod:`exporter.trust`). ``factory``, when given, is
    the caller's own choice: its module is trusted for this call. ``factory_from`` says
    where it came from when it is not the caller's (a manifest): then it is not trusted
    by being given.
    """
    source = Path(source)
    trust = Trust.of(trust)
    if factory is not None and factory_from == "the caller":
        trust = trust.with_module(factory.partition(":")[0])
    if source.is_dir():
        return _load_dir(source, spec, trust)
    if source.suffix == ".pt2":
        return _load_pt2(source, spec)
    if factory is None:
        raise ExportError(
            f"'{source}' is a weights file: also give the model factory "
            "(--factory package.module:callable) and the spec (--spec)"
        )
    if spec is None:
        raise ExportError(f"loading '{source}' needs a feature spec (--spec FILE)")
    module = _build(factory, kwargs or {}, source, trust, named_by=factory_from)
    return LoadedModel(
        spec=FeatureSpec.load(spec),
        module=module,
        source=_provenance(source, factory, kwargs or {}),
    )


def _build(
    factory: str, kwargs: dict[str, Any], weights: Path, trust: Trust, *, named_by: str
) -> torch.nn.Module:
    build = resolve_factory(factory, trust, named_by=named_by)  # refuses before any import
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"kwargs for factory '{factory}' must be a JSON object, found {kwargs!r}")
    state = read_state_dict(weights)  # read first: a bad checkpoint fails before any build
    try:
        module = build(**kwargs)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - report factory failures with context
        raise ExportError(f"factory '{factory}' failed with kwargs {kwargs}: {e}") from e
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"factory '{factory}' returned {type(module).__name__}, not an nn.Module")
    load_weights(module, state, str(weights))
    return module.eval()


def _load_dir(directory: Path, spec, trust: Trust) -> LoadedModel:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint directory '{directory}' has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text())
        factory, kwargs = cfg["factory"], cfg.get("kwargs", {})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"'{cfg_path}' must be JSON with 'factory' and 'kwargs' keys: {e}"
        ) from e
    weights = next(
        (directory / n for n in ("model.safetensors", "model.pt") if (directory / n).is_file()),
        None,
    )
    if weights is None:
        raise CheckpointError(f"checkpoint directory '{directory}' has no model.safetensors")
    spec_src = spec if spec is not None else find_spec(directory)
    if spec_src is None:
        raise CheckpointError(f"checkpoint directory '{directory}' has no spec.json; pass --spec")
    module = _build(factory, kwargs, weights, trust, named_by=f"'{cfg_path}'")
    return LoadedModel(
        spec=FeatureSpec.load(spec_src),
        module=module,
        source=_provenance(weights, factory, kwargs, directory=directory),
    )


def _load_pt2(path: Path, spec) -> LoadedModel:
    if spec is None:
        spec = find_spec(path.parent)
        if spec is None:
            raise ExportError(f"loading '{path}' needs a feature spec (--spec FILE)")
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"'{path}' is not a program saved by torch.export.save: {e}") from e
    from exporter.program import check_program

    spec = FeatureSpec.load(spec)
    check_program(program, spec, str(path))
    return LoadedModel(spec=spec, program=program, source=_provenance(path))


def _provenance(path: Path, factory=None, kwargs=None, directory=None) -> dict[str, Any]:
    return {
        "checkpoint": str(directory or path),
        "checkpoint_sha256": sha256_file(path),
        "factory": factory,
        "kwargs": kwargs,
    }
