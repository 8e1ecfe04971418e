"""The ONNX quantization pipeline: one list, in order, per target.

    canonicalize_linear -> QuantizeWeightsInt8Pass -> RemoveUnusedNodes -> lowering(target)

targets: "qdq" (standard DequantizeLinear -> MatMul, backend-neutral), "ort-cpu"
(MatMulNBits), "gpu" (DequantizeLinear with fp16 activations, TensorRT-friendly).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes.onnx._util import Refusal, const_array, node_name
from graph_passes.onnx.errors import PassError
from graph_passes.onnx.lower import Fp16ActivationsPass, LowerToMatMulNBitsPass
from graph_passes.onnx.quantize import MIN_K, QuantizeWeightsInt8Pass, weight_refusal

TARGETS = ("qdq", "ort-cpu", "gpu")

NBITS_MIN_ELEMENTS = 16384
"""On ORT CPU, weights below this many elements (64 KiB in fp32) stay float: MatMulNBits
(int8, accuracy_level=4) is no faster than fp32 GEMM there. Measured (2 threads, 8 layers
of a shape chained, ratio MatMulNBits / fp32 MatMul+Add at batch 1 and 512): [1024,1024]
0.21x / 0.75x; [256,128] 0.72x / 0.60x; [128,512] per token 0.55x / 0.90-1.02x (whole
per-token FFN); but [64,192] 1.06x / 2.34x, [128,64] 0.99x / 2.04x, [64,64] 1.28x / 2.09x,
[98,64] 1.14x / 3.16x, [28,128] 1.38x / 3.45x, [128,1] 1.32x / 1.89x: below ~16k elements
the weight bytes saved do not pay for the kernel's activation quantization."""


@dataclass
class QuantizeResult:
    """What the pipeline did: the layers it quantized and the ones it left alone, with reasons."""

    model: ir.Model
    quantized: list[tuple[str, str]] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


def linear_layers(model: ir.Model, min_k: int = MIN_K, min_elements: int = 0) -> list[str]:
    """Weight names of the quantizable linear layers: MatMuls whose constant weight passes
    ``weight_refusal`` (2-D float32, reduction dim >= ``min_k``, >= ``min_elements``
    elements), the very rule QuantizeWeightsInt8Pass applies, so a plan made from this list
    is what the pass does.

    Call on a canonicalised graph; these names are what ``skip``/``only`` accept (see
    ``NBITS_MIN_ELEMENTS`` for ``min_elements``).
    """
    from graph_passes.onnx.moe_match import router_weights
    from graph_passes.onnx.moe_quant import expert_tables, fused_banks

    routers = router_weights(model.graph)  # kept float: int8 could flip which experts run
    names: list[str] = []
    for node in model.graph:
        if node.op_type == "MatMul" and node.domain == "":
            b = node.inputs[1]
            w = const_array(b)
            refused = weight_refusal(w, b.name or "", min_k=min_k, min_elements=min_elements)
            if refused is None and b.name not in names and b.name not in routers:
                names.append(b.name)
    for node in expert_tables(model.graph):  # sparse MoE tables [T*E, K, N], per expert
        table = node.inputs[0]
        if const_array(table).size >= min_elements and table.name not in names:
            names.append(table.name)
    for node in fused_banks(model.graph):  # the fused form's two weights (one layer group)
        for w in (node.inputs[2], node.inputs[4]):
            if const_array(w).size >= min_elements and w.name not in names:
                names.append(w.name)
    return names


def quantize_onnx(
    model: ir.Model | onnx.ModelProto,
    *,
    bits: int = 8,
    block_size: int | None = None,
    target: str = "ort-cpu",
    skip: Iterable[str] = (),
    only: Iterable[str] | None = None,
    accuracy_level: int = 4,
    nbits_block_size: int = 128,
    canonicalize: bool = True,
    min_elements: int = 0,
) -> QuantizeResult:
    """Quantize ``model`` (a copy if given a ModelProto; in place for an ir.Model) for ``target``."""
    from graph_passes.onnx.canonicalize import canonicalize_linear

    if target not in TARGETS:
        raise PassError(f"target '{target}' is not one of {TARGETS}")
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    if canonicalize:
        canonicalize_linear(model, unroll_min_elements=min_elements)
    from graph_passes.onnx.moe_match import router_weights
    from graph_passes.onnx.moe_quant import QuantizeExpertTablesPass, QuantizeFusedMoEPass

    skip = set(skip) | router_weights(model.graph)
    tables = QuantizeExpertTablesPass(only=only, skip=skip, bits=bits)
    # W8 only (at other bits the fused form's banks stay float)
    fused = QuantizeFusedMoEPass(only=only, skip=skip, block_size=block_size or nbits_block_size)
    quant = QuantizeWeightsInt8Pass(
        bits=bits, block_size=block_size, skip=skip, only=only, min_elements=min_elements
    )
    passes: list[ir.passes.PassBase] = [tables, quant, common_passes.RemoveUnusedNodesPass()]
    if bits == 8:
        passes.insert(1, fused)
    lowering = None
    if target == "ort-cpu":
        lowering = LowerToMatMulNBitsPass(
            accuracy_level=accuracy_level, block_size=block_size or nbits_block_size
        )
    elif target == "gpu":
        lowering = Fp16ActivationsPass()
    if lowering is not None:
        passes += [lowering, common_passes.RemoveUnusedNodesPass()]
    ir.passes.Sequential(*passes)(model)
    refusals = [
        r for r in quant.refusals if not r.reason.startswith(("listed in skip", "not selected"))
    ]
    refusals += getattr(lowering, "refusals", [])
    return QuantizeResult(model, tables.quantized + fused.quantized + quant.quantized, refusals)


def describe(refusals: list[Refusal]) -> list[str]:
    """One readable line per refusal, for logs and reports."""
    return [f"{r.op_type} {r.node}: {r.reason}" for r in refusals]


__all__ = [
    "NBITS_MIN_ELEMENTS",
    "TARGETS",
    "QuantizeResult",
    "describe",
    "linear_layers",
    "node_name",
    "quantize_onnx",
]
