"""TensorRT's ONNX operator support matrix, as data.

Source: the onnx-tensorrt parser's support matrix, ``docs/operators.md`` in
https://github.com/onnx/onnx-tensorrt (the TensorRT 10.15 revision: "TensorRT 10.15 supports
operators in the inclusive range of opset 9 to opset 24"; ONNX data types DOUBLE, FLOAT32,
FLOAT16, BFLOAT16, FP8, FP4, INT32, INT64, INT8, INT4, UINT8, BOOL; DOUBLE is cast down to
FLOAT with clamping; INT8/INT4/FP8/FP4 are "quantized types", only reachable through
(De)QuantizeLinear from a wider float; UINT8 only as network input/output).

``OPS[op] = OpSupport(types, restrictions)``: ``types`` are the ONNX dtype names the matrix
lists for the op (checked on the op's data operand, see ``OUTPUT_TYPED``), ``restrictions``
the matrix's text, shown as the fix hint. Ops the matrix marks "N" are in ``UNSUPPORTED``.
Ops absent from both are reported as unknown to TensorRT (the parser has no importer for
them, so they would need a plugin).
"""

from __future__ import annotations

from dataclasses import dataclass

TRT_VERSION_OF_TABLE = "10.15"
MIN_OPSET, MAX_OPSET = 9, 24
SOURCE = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15)"

# Matrix abbreviations -> ONNX TensorProto data type names (onnx_ir.DataType names).
_ABBREV = {
    "FP32": "FLOAT",
    "FP16": "FLOAT16",
    "BF16": "BFLOAT16",
    "INT32": "INT32",
    "INT64": "INT64",
    "INT8": "INT8",
    "UINT8": "UINT8",
    "BOOL": "BOOL",
    "FP8": "FLOAT8E4M3FN",
    "FP4": "FLOAT4E2M1",
    "INT4": "INT4",
}
# Every ONNX dtype TensorRT knows at all; anything else (STRING, COMPLEX*, UINT16/32/64,
# INT16, FLOAT8E5M2...) cannot appear anywhere in a graph TensorRT parses.
KNOWN_DTYPES = frozenset(_ABBREV.values()) | {"DOUBLE"}
QUANTIZED_DTYPES = frozenset({"INT8", "INT4", "FLOAT8E4M3FN", "FLOAT4E2M1"})


@dataclass(frozen=True)
class OpSupport:
    """One row of the matrix: the dtypes the op supports and its documented restrictions."""

    types: frozenset[str]
    restrictions: str = ""


def _row(types: str, restrictions: str = "") -> OpSupport:
    return OpSupport(
        frozenset(_ABBREV[t.strip()] for t in types.split(",") if t.strip()), restrictions
    )


F = "FP32, FP16, BF16"
FI = F + ", INT32, INT64"
FIB = FI + ", BOOL"

OPS: dict[str, OpSupport] = {
    **{
        op: _row(FI)
        for op in (
            "Abs",
            "Add",
            "ArgMax",
            "ArgMin",
            "Div",
            "Equal",
            "Greater",
            "GreaterOrEqual",
            "Less",
            "LessOrEqual",
            "Max",
            "Min",
            "Mod",
            "Mul",
            "Neg",
            "Pow",
            "Range",
            "Relu",
            "Sign",
            "Sub",
            "Sum",
            "DepthToSpace",
            "SpaceToDepth",
            "Pad",
            "Shrink",
            "IsNaN",
            "Scatter",
            "ScatterElements",
        )
    },
    **{
        op: _row(F)
        for op in (
            "Acos",
            "Acosh",
            "Asin",
            "Asinh",
            "Atan",
            "Atanh",
            "BatchNormalization",
            "Ceil",
            "Celu",
            "Clip",
            "Conv",
            "ConvTranspose",
            "Cos",
            "Cosh",
            "Einsum",
            "Elu",
            "Erf",
            "Exp",
            "Floor",
            "Gemm",
            "GlobalAveragePool",
            "GlobalLpPool",
            "GlobalMaxPool",
            "GroupNormalization",
            "HardSigmoid",
            "HardSwish",
            "ImageScaler",
            "InstanceNormalization",
            "IsInf",
            "LeakyRelu",
            "Log",
            "LogSoftmax",
            "LRN",
            "LpNormalization",
            "MatMul",
            "MeanVarianceNormalization",
            "ParametricSoftplus",
            "PRelu",
            "RandomNormal",
            "RandomNormalLike",
            "RandomUniform",
            "RandomUniformLike",
            "Reciprocal",
            "RMSNormalization",
            "Round",
            "ScaledTanh",
            "Scan",
            "Selu",
            "Sigmoid",
            "Sin",
            "Sinh",
            "Softmax",
            "Softplus",
            "Softsign",
            "Sqrt",
            "Tan",
            "Tanh",
            "ThresholdedRelu",
            "Upsample",
        )
    },
    **{
        op: _row(FIB)
        for op in (
            "Concat",
            "Expand",
            "Flatten",
            "Gather",
            "GatherElements",
            "GatherND",
            "Identity",
            "If",
            "Loop",
            "Reshape",
            "ReverseSequence",
            "Shape",
            "Size",
            "Slice",
            "Split",
            "Squeeze",
            "Tile",
            "Transpose",
            "Trilu",
            "Unsqueeze",
            "Where",
            "EyeLike",
        )
    },
    **{
        op: _row(FI, "`axes` must be an initializer")
        for op in (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
        )
    },
    "And": _row("BOOL"),
    "Or": _row("BOOL"),
    "Xor": _row("BOOL"),
    "Not": _row("BOOL"),
    "Attention": _row(
        F + ", INT8, FP8",
        "Q, K, V and attn_mask must be 4-D; past_key/"
        "past_value/nonpad_kv_seqlen inputs, present_*/qk_matmul_output outputs, "
        "qk_matmul_output_mode and softcap are unsupported",
    ),
    "AveragePool": _row(F, "2D or 3D pooling only; `dilations` must be empty or all ones"),
    "MaxPool": _row(
        F,
        "2D or 3D pooling only; `Indices` output unsupported; `dilations` "
        "must be empty or all ones",
    ),
    "LpPool": _row(F, "`dilations` must be empty or all ones"),
    "BlackmanWindow": _row("FP32, FP16"),
    "HammingWindow": _row("FP32, FP16"),
    "HannWindow": _row("FP32, FP16"),
    "Mish": _row("FP32, FP16"),
    "Cast": _row(FI + ", UINT8, BOOL"),
    "CastLike": _row(FI + ", UINT8, BOOL"),
    "Constant": _row(
        F + ", FP8, FP4, INT4, INT32, INT64, BOOL",
        "`sparse_value`, `value_string` and `value_strings` are unsupported",
    ),
    "ConstantOfShape": _row(F + ", FP8, FP4, INT4, INT32, INT64, BOOL"),
    "CumSum": _row(F, "`axis` must be a build-time constant"),
    "DeformConv": _row("FP32, FP16", "1D or 2D spatial input; symmetric pads"),
    "DequantizeLinear": _row("INT8, FP8, FP4, INT4", "`x_zero_point` must be zero"),
    "QuantizeLinear": _row(F, "`y_zero_point` must be 0"),
    "Dropout": _row(F, "`is_training` must be an initializer and evaluate to False"),
    "Gelu": _row(F + ", INT8, INT32, INT64"),
    "GridSample": _row("FP32, FP16", "input must be 4-D"),
    "GRU": _row(F, "bidirectional GRUs need the same activations both ways"),
    "LSTM": _row(
        F, "bidirectional: same activations both ways; `input_forget` and `layout` must be 0"
    ),
    "RNN": _row(F, "bidirectional RNNs need the same activations both ways"),
    "Hardmax": _row(F, "`axis` dimension must be a build-time constant"),
    "LayerNormalization": _row(F, "only the first output `Y` is supported"),
    "Mean": _row(F + ", FP8, INT32, INT64"),
    "NonMaxSuppression": _row("FP32, FP16"),
    "NonZero": _row("FP32, FP16"),
    "OneHot": _row(FIB, "`depth` must be a build-time constant"),
    "Resize": _row(F, "modes nearest/linear; aspect ratio policy stretch; no antialiasing"),
    "RoiAlign": _row("FP32, FP16"),
    "RotaryEmbedding": _row(F, "`position_ids` must be INT64"),
    "STFT": _row("FP32", "`frame_step` and `window` must be initializers; real input"),
    "ScatterND": _row(FI, "`reduction` other than `none` is not supported"),
    "TensorScatter": _row(F + ", INT32", "`past_cache` and `update` 4-D; `axis` must be -2"),
    "TopK": _row(FI, "`sorted` must be 1; `K` must be less than 3840"),
}

UNSUPPORTED: frozenset[str] = frozenset(
    {
        "AffineGrid",
        "Bernoulli",
        "BitShift",
        "BitwiseAnd",
        "BitwiseNot",
        "BitwiseOr",
        "BitwiseXor",
        "Col2Im",
        "CenterCropPad",
        "Compress",
        "ConcatFromSequence",
        "ConvInteger",
        "DFT",
        "Det",
        "DynamicQuantizeLinear",
        "ImageDecoder",
        "MatMulInteger",
        "MaxRoiPool",
        "MaxUnpool",
        "MelWeightMatrix",
        "Multinomial",
        "NegativeLogLikelihoodLoss",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
        "QLinearConv",
        "QLinearMatMul",
        "RegexFullMatch",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SequenceMap",
        "SoftmaxCrossEntropyLoss",
        "SplitToSequence",
        "StringConcat",
        "StringNormalizer",
        "StringSplit",
        "TfIdfVectorizer",
        "Unique",
    }
)

# Ops whose matrix types describe what they produce (their inputs are shapes, indices or
# nothing): the check reads output 0. Every other op is checked on input 0 (its data).
OUTPUT_TYPED = frozenset(
    {"Cast", "CastLike", "Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike"}
)

# Inputs that must be build-time constants (initializers / Constant outputs), by op.
CONSTANT_INPUTS: dict[str, dict[int, str]] = {
    **{
        op: {1: "axes"}
        for op in (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
            "Squeeze",
            "Unsqueeze",
        )
    },
    "CumSum": {1: "axis"},
    "OneHot": {1: "depth"},
    "TopK": {1: "K"},
    "Dropout": {2: "training_mode"},
    "STFT": {1: "frame_step", 2: "window"},
}

# Fixes for the common cases, keyed by op (shown with the finding).
FIXES: dict[str, str] = {
    "Unique": "compute unique values outside the model (in the feature pipeline) or with a "
    "fixed-size formulation (sort + mask)",
    "DynamicQuantizeLinear": "use weight-only quantization (DequantizeLinear on constant "
    "weights: --precision w8a16) instead of dynamic activation "
    "quantization",
    "MatMulInteger": "express int8 matmuls as DequantizeLinear(weight) -> MatMul (W8A16)",
    "QLinearMatMul": "express int8 matmuls as DequantizeLinear(weight) -> MatMul (W8A16)",
    "SplitToSequence": "avoid Python lists of tensors in forward(); use torch.split/unbind with "
    "a static count",
    "SequenceConstruct": "avoid returning/iterating lists of tensors; stack them instead",
}
