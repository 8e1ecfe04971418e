"""Checkpoint directories: what the trainer writes and the exporter reads.

    <dir>/model.safetensors   state_dict (contiguous tensors; no pickles)
    <dir>/config.json         {"factory": "package.module:callable", "kwargs": {...}}
    <dir>/spec.json           the FeatureSpec dict
    <dir>/metrics.json        training / evaluation metrics

``factory(**kwargs)`` rebuilds the module; the weights then load with strict checking.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(
    module: torch.nn.Module,
    factory: str,
    kwargs: dict[str, Any],
    spec: dict[str, Any],
    out_dir: str | Path,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``module`` as a checkpoint directory; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"factory": factory, "kwargs": kwargs}, indent=2))
    (out / "spec.json").write_text(json.dumps(spec, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics or {}, indent=2, default=float))
    return out


def load_checkpoint(directory: str | Path) -> torch.nn.Module:
    """Rebuild the module of a checkpoint directory written by :func:`save_checkpoint`.

    Only the students' own factory is called (``config.json`` is data, and this helper trusts
    nothing else); the exporter's ``load_student`` loads other models under ``--trust-module``.
    """
    from students.zoo import FACTORY, build_model

    d = Path(directory)
    try:
        cfg = json.loads((d / "config.json").read_text())
        named = cfg["factory"]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"checkpoint '{d}': cannot read config.json: {e}") from e
    if named != FACTORY:
        raise ValueError(
            f"checkpoint '{d}' names factory {named!r}; students.checkpoint only rebuilds "
            f"'{FACTORY}' (load other models with exporter.load_student(..., trust=...))"
        )
    factory = build_model
    module = factory(**cfg.get("kwargs", {}))
    module.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    return module.eval()
