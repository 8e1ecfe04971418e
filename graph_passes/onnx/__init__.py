"""ONNX graph passes (onnx-ir): inference rewrites, canonicalisation, weight-only quantization,
backend lowering.

Every exported stage, at every precision, first gets ``optimize_inference`` (per_token.py:
per-token Einsum -> broadcast MatMul, which ONNX Runtime runs faster; hoist_gathered.py: the
layout ops after a Concat of gathered user rows run per part, the user part before its Gather).

The quantization pipeline, in order (see ``pipelines.quantize_onnx``):

    canonicalize_linear         fold constants, Gemm -> MatMul, unroll per-token weights (whole
                                per-token chains at once: UnrollPerTokenChainPass), DCE
    QuantizeWeightsInt8Pass     MatMul(A, W) -> MatMul(A, DequantizeLinear(Wq, scale))
    LowerToMatMulNBitsPass      ORT CPU: -> com.microsoft.MatMulNBits
    Fp16ActivationsPass         GPU: fp16 activations around the quantized MatMuls

Every node a pass creates carries ``metadata_props["ugsep.pass"]`` = the pass name.
"""

from __future__ import annotations

from graph_passes.onnx._util import PASS_KEY, Refusal
from graph_passes.onnx.accounting import linear_weight_bytes
from graph_passes.onnx.canonicalize import (
    GemmToMatMulPass,
    UnrollBatchedMatMulPass,
    UnrollPerTokenChainPass,
    canonicalize_linear,
)
from graph_passes.onnx.errors import PassError
from graph_passes.onnx.hoist_gathered import HoistGatheredConcatPass
from graph_passes.onnx.lower import Fp16ActivationsPass, LowerToMatMulNBitsPass, pack_matmul_nbits
from graph_passes.onnx.per_token import (
    PerTokenEinsumToMatMulPass,
    optimize_inference,
    per_token_plan,
)
from graph_passes.onnx.pipelines import linear_layers, quantize_onnx
from graph_passes.onnx.quantize import QuantizedWeight, QuantizeWeightsInt8Pass, quantize_weight

__all__ = [
    "PASS_KEY",
    "Fp16ActivationsPass",
    "GemmToMatMulPass",
    "HoistGatheredConcatPass",
    "LowerToMatMulNBitsPass",
    "PassError",
    "PerTokenEinsumToMatMulPass",
    "QuantizeWeightsInt8Pass",
    "QuantizedWeight",
    "Refusal",
    "UnrollBatchedMatMulPass",
    "UnrollPerTokenChainPass",
    "canonicalize_linear",
    "linear_layers",
    "linear_weight_bytes",
    "optimize_inference",
    "pack_matmul_nbits",
    "per_token_plan",
    "quantize_onnx",
    "quantize_weight",
]
