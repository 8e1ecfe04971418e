"""ugsep exporter: load a trained student, capture it, build ONNX stages, write a bundle.

The public names import lazily (PEP 562), so ``ugsep --help`` and the serving commands
import no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_student": "exporter.load",
    "LoadedModel": "exporter.load",
    "capture": "exporter.steps.capture",
    "to_torch_inputs": "exporter.steps.capture",
    "export_bundle": "exporter.pipeline",
    "ExportOptions": "exporter.pipeline",
    "PIPELINE": "exporter.pipeline",
    "ExportError": "exporter.errors",
    "CheckpointError": "exporter.errors",
    "model_factory": "exporter.trust",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'exporter' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
