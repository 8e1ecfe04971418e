"""The registry of students and teachers: ``build_student(kind, size)``, ``build_teacher(size)``.

Checkpoints record ``{"factory": "students.zoo:build_model", "kwargs": {"kind": ...,
"config": {...}}}``: the full config, so a checkpoint rebuilds the same module even if
the named sizes below change later.
"""

from __future__ import annotations

from typing import Any

from students.base import Student
from students.data import DATA_CONFIGS
from students.dcn import DCNConfig, DCNStudent
from students.rankmixer import RankMixerConfig, RankMixerStudent
from students.tokenmixer import TokenMixerConfig, TokenMixerStudent
from students.two_tower import TwoTowerConfig, TwoTowerStudent

__all__ = [
    "KINDS",
    "SIZES",
    "FACTORY",
    "build_model",
    "build_student",
    "build_teacher",
    "model_kwargs",
]

FACTORY = "students.zoo:build_model"
KINDS = {
    "rankmixer": (RankMixerConfig, RankMixerStudent),
    "dcn": (DCNConfig, DCNStudent),
    "twotower": (TwoTowerConfig, TwoTowerStudent),
    "tokenmixer": (TokenMixerConfig, TokenMixerStudent),
}
SIZES = ("tiny", "bench")

# Model sizes per (kind, size); the feature layout comes from DATA_CONFIGS[size].
_HYPER: dict[tuple[str, str], dict[str, Any]] = {
    ("rankmixer", "tiny"): {},
    ("rankmixer", "bench"): dict(
        emb_dim=16,
        d_model=128,
        n_user_tokens=8,
        n_cand_tokens=8,
        n_layers=4,
        ffn_mult=4,
        seq_width=64,
        seq_heads=4,
        seq_layers=2,
        target_heads=4,
    ),
    ("dcn", "tiny"): {},
    ("dcn", "bench"): dict(emb_dim=16, n_cross=3, deep=(256, 128)),
    ("twotower", "tiny"): {},
    ("twotower", "bench"): dict(emb_dim=16, tower=(256, 64)),
    ("tokenmixer", "tiny"): {},
    ("tokenmixer", "bench"): dict(
        emb_dim=16,
        d_model=128,
        n_user_tokens=8,
        n_cand_tokens=8,
        n_layers=2,
        ffn_mult=2,
        n_experts=16,
        top_k=2,
        seq_width=64,
        seq_heads=4,
        seq_layers=1,
        target_heads=4,
    ),
    # the teacher: a big DCN (wide embeddings, deep cross network); cheap to train on a CPU
    ("teacher", "tiny"): dict(emb_dim=24, n_cross=3, cross_rank=64, deep=(192, 96)),
    ("teacher", "bench"): dict(emb_dim=32, n_cross=3, cross_rank=128, deep=(512, 256)),
}


def build_model(kind: str, config: dict[str, Any]) -> Student:
    """Build a student of ``kind`` from a full config dict (what checkpoints store)."""
    # (registered below as a model factory: the one a students checkpoint may name)
    if kind not in KINDS:
        raise ValueError(f"unknown student kind '{kind}'; expected one of {', '.join(KINDS)}")
    config_cls, model_cls = KINDS[kind]
    return model_cls(config_cls(**config))


# A registered model factory (exporter.trust): set directly, since students/ imports no
# exporter code. Checkpoints naming it load with the default trust.
build_model.__ugsep_model_factory__ = True


def model_kwargs(kind: str, size: str) -> dict[str, Any]:
    """``build_model`` kwargs for a named (kind, size); kind ``teacher`` is a big DCN."""
    if size not in SIZES:
        raise ValueError(f"unknown size '{size}'; expected one of {', '.join(SIZES)}")
    if (kind, size) not in _HYPER:
        raise ValueError(
            f"unknown student kind '{kind}'; expected one of {', '.join(KINDS)} or teacher"
        )
    arch = "dcn" if kind == "teacher" else kind
    config_cls = KINDS[arch][0]
    config = config_cls.from_data(DATA_CONFIGS[size], name=f"{kind}_{size}", **_HYPER[(kind, size)])
    return {"kind": arch, "config": config.to_dict()}


def build_student(kind: str = "rankmixer", size: str = "tiny") -> Student:
    """A freshly initialised named student (``kind`` in KINDS, ``size`` in SIZES)."""
    return build_model(**model_kwargs(kind, size))


def build_teacher(size: str = "tiny") -> Student:
    """The larger teacher (a big DCN) for a data size."""
    return build_model(**model_kwargs("teacher", size))
