"""Weight-only quantization of constant-weight MatMuls, in standard ONNX.

    MatMul(A, W[K, N])  ->  MatMul(A, DequantizeLinear(Wq, scale[, axis, block_size]))

int8 symmetric per output channel by default (scale [N], axis=1: opset 13, read by every
backend); block-wise along K as an option (scale [ceil(K/bs), N], axis=0, block_size: opset
21); int4 is block-wise only. Zero points are omitted (symmetric). This is the backend-neutral
form; graph_passes.onnx.lower turns it into what a backend runs fastest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graph_passes.onnx._util import (
    Refusal,
    add_initializer,
    const_array,
    node_name,
    require_opset,
    tag,
)
from graph_passes.onnx.errors import PassError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedWeight:
    """Symmetric quantization of a [K, N] weight: ``w ≈ q * scale`` (broadcast per block/channel)."""

    q: np.ndarray  # int8 values in [-qmax, qmax], shape [K, N]
    scale: np.ndarray  # float32, [N] per channel or [ceil(K/bs), N] per block
    bits: int
    block_size: int | None  # None: per output channel

    def dequantize(self) -> np.ndarray:
        """The float weight the quantized graph computes with (the numpy reference)."""
        if self.block_size is None:
            return self.q.astype(np.float32) * self.scale[None, :]
        rows = np.repeat(self.scale, self.block_size, axis=0)[: self.q.shape[0]]
        return self.q.astype(np.float32) * rows


def quantize_weight(w: np.ndarray, bits: int = 8, block_size: int | None = None) -> QuantizedWeight:
    """Symmetric round-to-nearest quantization of a 2-D [K, N] weight (K = reduction axis)."""
    if w.ndim != 2:
        raise PassError(f"quantize_weight expects a 2-D [K, N] weight, got shape {w.shape}")
    qmax = (1 << (bits - 1)) - 1  # 127 / 7: symmetric range, -qmax..qmax
    w = w.astype(np.float32)
    k, n = w.shape
    if block_size is None:
        amax = np.abs(w).max(axis=0)
    else:
        nb = -(-k // block_size)
        padded = np.zeros((nb * block_size, n), np.float32)
        padded[:k] = w
        amax = np.abs(padded.reshape(nb, block_size, n)).max(axis=1)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    full = scale[None, :] if block_size is None else np.repeat(scale, block_size, axis=0)[:k]
    q = np.clip(np.rint(w / full), -qmax, qmax).astype(np.int8)
    return QuantizedWeight(q, scale, bits, block_size)


MIN_K = 16
"""Weights with a reduction dim below this stay float: MatMulNBits pads K to 16, so int8
would not even save bytes there."""


def weight_refusal(
    w: np.ndarray | None, name: str, *, min_k: int = MIN_K, min_elements: int = 0
) -> str | None:
    """Why a MatMul weight stays float (None: it is quantizable). The one rule that both
    ``QuantizeWeightsInt8Pass`` and ``linear_layers`` (what selection plans with) apply."""
    if w is None:
        return f"weight '{name}' is not a constant"
    if w.ndim != 2:
        return f"weight '{name}' has rank {w.ndim}; run UnrollBatchedMatMulPass first"
    if w.dtype != np.float32:
        return f"weight '{name}' is {w.dtype}, expected float32"
    if w.shape[0] < min_k:
        return f"weight '{name}' has K={w.shape[0]} < min_k={min_k}: too small to gain"
    if w.size < min_elements:
        return f"weight has {w.size} elements < min_elements={min_elements}"
    return None


class QuantizeWeightsInt8Pass(ir.passes.InPlacePass):
    """Replace each constant 2-D float32 MatMul weight by ``DequantizeLinear(int weight, scale)``.

    Args:
        bits: 8 (default) or 4.
        block_size: None = per output channel (int8 only); else block-wise along K.
        skip: node names (or weight initializer names) to keep in float.
        only: if given, quantize only these node/weight names (used by sensitivity analysis).
        min_elements: weights smaller than this stay float (not worth a kernel change).
        min_k: weights with a reduction dim below this stay float (MatMulNBits pads K to
            16, so int8 would not even save bytes there).

    After the call, ``self.quantized`` lists the layers it quantized (node name, weight name)
    and ``self.refusals`` the MatMuls it left alone and why.
    """

    def __init__(
        self,
        bits: int = 8,
        block_size: int | None = None,
        skip: Iterable[str] = (),
        only: Iterable[str] | None = None,
        min_elements: int = 0,
        min_k: int = MIN_K,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise PassError(f"bits must be 8 or 4, got {bits}")
        if bits == 4 and block_size is None:
            raise PassError(
                "int4 weights need a block_size (e.g. 32); per-channel int4 is too coarse"
            )
        if block_size is not None and (block_size < 2 or block_size & (block_size - 1)):
            raise PassError(f"block_size must be a power of two >= 2, got {block_size}")
        self.bits, self.block_size = bits, block_size
        self.skip, self.only = set(skip), None if only is None else set(only)
        self.min_elements, self.min_k = min_elements, min_k
        self.quantized: list[tuple[str, str]] = []
        self.refusals: list[Refusal] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.quantized, self.refusals = [], []
        if self.block_size is not None:
            require_opset(model, 21, "block-wise / int4 DequantizeLinear")
        done: dict[ir.Value, ir.Value] = {}  # float weight -> its DQ output (weights may be shared)
        for node in list(model.graph):
            if node.op_type == "MatMul" and node.domain == "":
                reason = self._try_quantize(model.graph, node, done)
                if reason is not None:
                    self.refusals.append(Refusal(node_name(node), node.op_type, reason))
                    log.debug("QuantizeWeightsInt8Pass: left %s alone: %s", node_name(node), reason)
        return ir.passes.PassResult(model, bool(self.quantized))

    def _try_quantize(self, graph: ir.Graph, node: ir.Node, done: dict) -> str | None:
        b = node.inputs[1]
        w = const_array(b)
        reason = weight_refusal(w, b.name or "", min_k=self.min_k, min_elements=self.min_elements)
        if reason is not None:
            return reason
        names = {node.name, b.name}
        if names & self.skip:
            return "listed in skip: kept in float"
        if self.only is not None and not names & self.only:
            return "not selected (only=...)"
        if b not in done:
            done[b] = self._dequantize_node(graph, node, b, w)
        node.replace_input_with(1, done[b])
        node.metadata_props["ugsep.weight"] = b.name or ""
        node.metadata_props["ugsep.quantized"] = self._scheme()
        self.quantized.append((node_name(node), b.name or ""))
        return None

    def _scheme(self) -> str:
        return f"int{self.bits}/" + (
            "channel" if self.block_size is None else f"block{self.block_size}"
        )

    def _dequantize_node(
        self, graph: ir.Graph, node: ir.Node, b: ir.Value, w: np.ndarray
    ) -> ir.Value:
        qw = quantize_weight(w, self.bits, self.block_size)
        payload = qw.q if self.bits == 8 else qw.q.astype(ml_dtypes.int4)
        q = add_initializer(graph, f"{b.name}_q{self.bits}", payload)
        s = add_initializer(graph, f"{b.name}_scale", qw.scale)
        if self.block_size is None:
            attrs = [ir.AttrInt64("axis", 1)]
        else:
            attrs = [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", self.block_size)]
        dq = ir.Node("", "DequantizeLinear", [q, s], attributes=attrs, name=f"{b.name}_dq")
        tag(dq, self.__class__.__name__, scheme=self._scheme())
        graph.insert_before(node, dq)
        out = dq.outputs[0]
        out.name = f"{b.name}_dq"
        out.shape, out.type = ir.Shape(w.shape), ir.TensorType(ir.DataType.FLOAT)
        return out
