"""ugsep exporter: load a trained student, capture it, build ONNX stages, write a bundle."""

from __future__ import annotations

from exporter.capture import capture, to_torch_inputs
from exporter.errors import CheckpointError, ExportError
from exporter.load import LoadedModel, load_student
from exporter.pipeline import PIPELINE, ExportOptions, export_bundle

__all__ = [
    "load_student",
    "LoadedModel",
    "capture",
    "to_torch_inputs",
    "export_bundle",
    "ExportOptions",
    "PIPELINE",
    "ExportError",
    "CheckpointError",
]
