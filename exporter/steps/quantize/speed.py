"""Quantize step, job 6 (speed): one stage's weight-only configurations, timed on this CPU.

For every stage: the fp32 graph as exported, and the graph quantized under each speed
configuration (``min_elements`` in ``MIN_ELEMENTS_GRID`` x per-token weights unrolled and
quantized or kept as one fp32 batched MatMul), at the stage's batch (exporter.timing), interleaved
rounds, medians; the fastest configuration wins (on a tie, and never slower than fp32, the
one that quantizes the most weight elements: the smaller bundle).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from exporter import timing

log = logging.getLogger(__name__)

MIN_ELEMENTS_GRID = (0, 16384, 131072)
TIE = 0.0  # exact ties only: measured, a 2.6% tuner gap was 9% in the benchmark
FP32 = "fp32"


def choose(configs: list[timing.Config], medians: dict[str, float], tie: float = TIE) -> timing.Config:
    """The fastest config; among those within ``tie`` of it and no slower than fp32, the one
    quantizing the most weight elements (speed first, then the smaller bundle)."""
    best = min(medians.values())
    fp32 = medians.get(FP32, float("inf"))
    near = [
        c
        for c in configs
        if medians[c.name] <= best * (1 + tie) and (c.name == FP32 or medians[c.name] <= fp32)
    ]
    return max(near, key=lambda c: (c.quantized_elements, -medians[c.name]))


def tune_stage(
    stage: str,
    proto: onnx.ModelProto,
    build: Callable[[int, bool], tuple[onnx.ModelProto, list[str], int] | None],
    *,
    batch: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time the fp32 stage and its quantized configurations; return the record of the choice.

    ``build(min_elements, per_token)`` gives (quantized proto, quantized weight names, weight
    elements quantized) or None when that configuration quantizes nothing.
    """
    batch = timing.stage_batch(stage) if batch is None else batch
    configs = _configs(proto, build)
    medians = timing.time_configs(configs, batch, threads=threads) if len(configs) > 1 else {FP32: 0.0}
    chosen = choose(configs, medians)
    base = medians[FP32] or 1.0
    rows = [
        {
            "config": c.name,
            "min_elements": c.min_elements,
            "per_token": c.per_token,
            "layers": c.layers,
            "quantized_elements": c.quantized_elements,
            "median_ms": round(medians[c.name] * 1e3, 4),
            "ratio_vs_fp32": round(medians[c.name] / base, 4),
        }
        for c in configs
    ]
    fastest_quantized = min(
        (c for c in configs if c.name != FP32), key=lambda c: medians[c.name], default=None
    )
    log.info(
        "speed tuning %s (batch %d): %s -> %s",
        stage,
        batch,
        ", ".join(f"{r['config']} {r['ratio_vs_fp32']:.2f}x" for r in rows[1:]) or "nothing to quantize",
        chosen.name,
    )
    return {
        "batch": batch,
        "chosen": chosen.name,
        "min_elements": chosen.min_elements,
        "per_token": chosen.per_token,
        "fastest_quantized": None if fastest_quantized is None else fastest_quantized.name,
        "configs": rows,
    }


def _configs(proto: onnx.ModelProto, build) -> list[timing.Config]:
    """The fp32 graph and each distinct configuration of ``MIN_ELEMENTS_GRID`` x per-token."""
    configs = [timing.Config(FP32, None, False, proto)]
    seen: set[frozenset[str]] = set()
    for m in MIN_ELEMENTS_GRID:
        for per_token in (False, True):
            built = build(m, per_token)
            if built is None:
                continue
            q, names, elements = built
            key = frozenset(names)
            if key in seen:  # e.g. per_token on a stage without per-token weights
                continue
            seen.add(key)
            tag = f"min_elements={m},per_token={'on' if per_token else 'off'}"
            configs.append(timing.Config(tag, m, per_token, q, elements, len(names)))
    return configs


def quantized_elements(proto: onnx.ModelProto, names: list[str]) -> int:
    """Elements of the named initializers (the weights a configuration quantizes)."""
    wanted = set(names)
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.name in wanted)
