"""Pipeline step ``optimize``: numerics-preserving ONNX rewrites on every stage, every precision.

Runs after ``split`` and before ``quantize``, on full.onnx and user/group alike, so the
baseline the split is measured against gets the same optimisation (a fair comparison) and
the quantizer starts from the graphs that are served. The rewrites themselves live in
``graph_passes.onnx.optimize_inference``; this step only converts and reports.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import onnx
import onnx_ir as ir

from graph_passes.onnx import PASS_KEY, optimize_inference

if TYPE_CHECKING:
    from exporter.pipeline import ExportContext

log = logging.getLogger(__name__)


def optimize_stage(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """``proto`` after ``optimize_inference``, and how many nodes each pass created."""
    model = ir.serde.deserialize_model(proto)
    result = optimize_inference(model)
    if not result.modified:
        return proto, {}
    made = Counter(
        n.metadata_props[PASS_KEY] for n in result.model.graph if PASS_KEY in n.metadata_props
    )
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out)
    return out, dict(made)


def step_optimize(ctx: ExportContext) -> None:
    """Rewrite every stage in ``ctx.stages`` in place (see the module docstring)."""
    for stage, proto in list(ctx.stages.items()):
        ctx.stages[stage], made = optimize_stage(proto)
        if made:
            log.info("optimize %s: %s", stage, made)
