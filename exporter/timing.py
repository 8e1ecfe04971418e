"""Time candidate graphs on this machine: every step that tunes (optimize, moe_form, quantize,
threads) measures its choices here, as ONNX Runtime CPU will run them.

Which layers pay to run as MatMulNBits on this CPU: measured per stage, not assumed.

Whether ONNX Runtime's weight-only int8 kernel beats fp32 GEMM depends on the CPU, the
weight's shape and the batch. Measured on two x86-64 machines (2 threads, ORT 1.32,
accuracy_level=4): a per-token FFN weight [128, 512] at batch 1 ran 0.55x fp32 on one and
0.94x on an AMD EPYC (Zen 3, AVX2, no VNNI), where the T extra nodes of an unrolled
per-token chain then cost more than the bytes they save; [1024, 1024] at batch 1 ran
0.21x / 0.30x; every shape lost at batch 256. A fixed threshold tuned on one machine is
wrong on the other, so, as TensorRT picks tactics by timing them, the exporter
(``exporter.steps.quantize.tune_for_speed``, the configurations in
``exporter.steps.quantize.speed``) times each
stage graph the way it will run:

  for every stage: the fp32 graph as exported, and the graph quantized under each speed
  configuration (``min_elements`` in ``MIN_ELEMENTS_GRID`` x per-token weights unrolled and
  quantized or kept as one fp32 batched MatMul), at the stage's batch (user side 1: one
  user per request; group and full ``TUNE_CANDIDATES`` candidates), interleaved rounds,
  medians; the fastest configuration wins (on a tie, and never slower than fp32, the one
  that quantizes the most weight elements: the smaller bundle).

A group graph serves any candidate count, and what pays at N=256 (often: fp32 GEMM) loses
at N=1 (where weight bytes dominate, as on the user side). So the group stage is also
tuned at batch 1 (``SMALL_BATCH``); when that choice differs from the large-batch one and
runs faster at N=1, ``crossover`` times both graphs at growing N (``CROSSOVER_GRID``) and the
bundle gets a ``group_small`` stage serving calls of up to the last N where it still won
(the runtime picks the graph per call, as TensorRT picks an optimization profile).

Whole-graph timing (not per-layer microbenchmarks) counts what a layer costs in place:
the Split/Concat and per-node dispatch an unrolled chain adds. The result (every
configuration's median and ratio to fp32) goes into ``manifest.quantization.speed_tuning``.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

# the CPU reading lives in the runtime (it never imports the exporter); re-exported here
from runtime.cpu import cpu_flags, cpu_name, cpu_summary  # noqa: F401

log = logging.getLogger(__name__)

TUNE_CANDIDATES = 256
SMALL_BATCH = 1
CROSSOVER_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Config:
    """One speed configuration of a stage and the graph it produces."""

    name: str
    min_elements: int | None  # None: the fp32 graph as exported
    per_token: bool
    proto: onnx.ModelProto
    quantized_elements: int = 0
    layers: int = 0
    threads: int | None = None  # intra-op threads for this config; None: the timing call's


def stage_batch(stage: str) -> int:
    """The batch a stage is timed at: the user side runs once per distinct user."""
    return 1 if stage == "user" else TUNE_CANDIDATES


def _feeds(sess, batch: int) -> dict[str, np.ndarray]:
    """Valid inputs for any stage: ids 0 (in every vocabulary), floats N(0, 1), one user."""
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else (1 if d == "M" else batch) for d in i.shape]
        if i.name == "user_index" or "int" in i.type:
            feeds[i.name] = np.zeros(shape, np.int64 if "int64" in i.type else np.int32)
        elif "float16" in i.type:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float16)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def recorded_medians(medians: dict[str, float]) -> dict[str, float]:
    """Medians (s) at the resolution the manifest records them (0.1 µs: ``median_ms`` to 4
    decimals), so the choice made from them is the one a reader recomputes from the record
    (at batch 1 two configurations can sit within that resolution of the tie line)."""
    return {k: round(v * 1e3, 4) / 1e3 for k, v in medians.items()}


def time_configs(
    configs: list[Config], batch: int, *, threads: int | None = None, budget_s: float = 4.0
) -> dict[str, float]:
    """Median seconds per run of each config's graph at ``batch``, interleaved round by round
    (each config with its own ``threads`` if set, else ``threads``; None: ORT's default), at
    the resolution every tuner records them (``recorded_medians``): each step that chooses
    from these decides on the figures its record shows."""
    import onnxruntime as ort

    from runtime.backends.ort import OrtBackend

    def options(c: Config):
        so = OrtBackend(intra_op_threads=c.threads or threads).session_options()
        so.log_severity_level = 3
        return so

    sessions = {
        c.name: ort.InferenceSession(
            c.proto.SerializeToString(), options(c), providers=["CPUExecutionProvider"]
        )
        for c in configs
    }
    feeds = {name: _feeds(s, batch) for name, s in sessions.items()}
    first = {}
    for name, s in sessions.items():  # warm up; the first timed run sizes the rounds
        s.run(None, feeds[name])
        t = time.perf_counter()
        s.run(None, feeds[name])
        first[name] = time.perf_counter() - t
    per_round = sum(first.values())
    reps = max(1, min(20, int(0.02 / max(min(first.values()), 1e-6))))
    rounds = int(min(25, max(5, budget_s / max(per_round * reps, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t = time.perf_counter()
            for _ in range(reps):
                s.run(None, feeds[name])
            times[name].append((time.perf_counter() - t) / reps)
    return recorded_medians({name: statistics.median(v) for name, v in times.items()})


def crossover(
    small: onnx.ModelProto,
    large: onnx.ModelProto,
    *,
    threads: int | None = None,
    small_threads: int | None = None,
    grid: tuple[int, ...] = CROSSOVER_GRID,
    budget_s: float = 1.0,
) -> tuple[int, list[dict[str, Any]]]:
    """(largest N of ``grid`` up to which ``small`` ran faster than ``large`` at every grid
    point, 0 if not even at the first; the timings). Stops at the first N it loses.
    ``small_threads`` runs ``small`` with its own intra-op thread count."""
    configs = [
        Config("small", 0, False, small, threads=small_threads),
        Config("large", None, False, large),
    ]
    rows, max_rows = [], 0
    for n in grid:
        med = time_configs(configs, n, threads=threads, budget_s=budget_s)
        ratio = med["small"] / (med["large"] or 1e-9)
        rows.append(
            {
                "candidates": n,
                "small_ms": round(med["small"] * 1e3, 4),
                "large_ms": round(med["large"] * 1e3, 4),
                "ratio": round(ratio, 4),
            }
        )
        if ratio >= 1.0:
            break
        max_rows = n
    log.info(
        "group graph for small calls: %s -> serves up to %d candidates",
        ", ".join(f"N={r['candidates']} {r['ratio']:.2f}x" for r in rows),
        max_rows,
    )
    return max_rows, rows
