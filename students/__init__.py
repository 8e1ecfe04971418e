"""Reference students for ugsep, synthetic CTR data with a known click model, and a trainer.

    from students import build_student, distill, make_dataset
    world, train_rows, heldout = make_dataset("tiny", seed=0)
    model = build_student("rankmixer", "tiny")  # or "dcn", "twotower", "tokenmixer"; "bench"
    report = distill(kind="rankmixer", size="tiny", out_dir="runs/rm")

Modules: ``data`` (generator, .npz files), ``metrics`` (numpy AUC / log-loss / Bayes AUC),
``rankmixer`` / ``dcn`` / ``two_tower`` / ``tokenmixer`` (the students; ``moe``: the
sparse per-token MoE layer of ``tokenmixer``), ``zoo`` (named configs and the
checkpoint factory ``students.zoo:build_model``), ``checkpoint`` (checkpoint directories),
``train`` (distillation). ``data`` and ``metrics`` need only numpy; importing this package
imports nothing heavy until one of the names below is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "build_student",
    "build_teacher",
    "build_model",
    "distill",
    "make_dataset",
    "World",
    "save_checkpoint",
    "load_checkpoint",
    "auc",
    "log_loss",
]

_WHERE = {
    "build_student": "students.zoo",
    "build_teacher": "students.zoo",
    "build_model": "students.zoo",
    "distill": "students.train",
    "make_dataset": "students.data",
    "World": "students.data",
    "save_checkpoint": "students.checkpoint",
    "load_checkpoint": "students.checkpoint",
    "auc": "students.metrics",
    "log_loss": "students.metrics",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'students' has no attribute '{name}'")
