"""Weight-only quantization of a bundle's ONNX stages, guided by measured sensitivity.

    quantized, record = quantize_bundle_stages(
        {"full": full, "user": user, "group": group}, spec,
        precision="w8a16", target="ort-cpu",
        calibration=Calibration(rows, reference, labels, request_ids),
    )

Procedure (per serving path: user+group together when split, full on its own):

 1. canonicalise every stage once (graph_passes.onnx.canonicalize_linear);
 2. quantize everything, run the stages with ONNX Runtime on the held-out rows and
    compare with the EAGER fp32 outputs (``calibration.reference``) under the budget
    (the parity budgets for the precision: |ΔAUC|, top-10 overlap, max abs error);
 3. measure each layer group alone (a 2-D weight, or all tokens of one per-token weight),
    quantized with everything else in float: its effect is the table in the manifest;
 4. if step 2 missed the budget, keep in float the most damaging groups (ranked by the
    share of the budget each uses alone, ``budget_damage``), one more at a time, until the
    budget is met: the fewest layers in float this ranking allows.

The record (``manifest.quantization``) holds the scheme, the budget, the outcome of the
all-layers and the selected configurations, the per-layer table and weight bytes per stage.

The jobs, one module each: ``options`` (QuantizeOptions, targets), ``build`` (the quantized
graphs of a serving path), ``calibrate`` (held-out rows, eager reference), ``runner`` (its
own ONNX Runtime sessions, measuring a candidate), ``select`` (sensitivity-guided selection;
``noise``: the selection judges |ΔAUC| as the held-out verdict will), ``speed`` / ``tune``
(speed configurations timed on this CPU, exporter.timing), ``small`` (the ``group_small``
stage), ``bundle`` (``quantize_bundle_stages``), ``step`` (the pipeline step).
"""

from __future__ import annotations

from exporter.steps.quantize.build import group_of
from exporter.steps.quantize.bundle import quantize_bundle_stages
from exporter.steps.quantize.calibrate import (
    CALIBRATION_ROWS,
    CANDIDATES_PER_REQUEST,
    Calibration,
    calibration_for,
)
from exporter.steps.quantize.options import (
    PRECISIONS,
    TARGET_DEFAULTS,
    TARGETS,
    QuantizeOptions,
    QuantizeStepOptions,
)
from exporter.steps.quantize.select import budget_damage
from exporter.steps.quantize.step import step_quantize
from exporter.steps.quantize.tune import tune_for_speed

__all__ = [
    "CALIBRATION_ROWS",
    "CANDIDATES_PER_REQUEST",
    "PRECISIONS",
    "TARGETS",
    "TARGET_DEFAULTS",
    "Calibration",
    "QuantizeOptions",
    "QuantizeStepOptions",
    "budget_damage",
    "calibration_for",
    "group_of",
    "quantize_bundle_stages",
    "step_quantize",
    "tune_for_speed",
]
