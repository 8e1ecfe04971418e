"""W8A8: int8 weights and dynamically quantized int8 activations, for ONNX Runtime CPU.

    MatMul(A, W[K, N]) [+ Add(bias[N])]
        ->  com.microsoft.DynamicQuantizeMatMul(A, Wq int8 [K, N], scale [N], , bias[N])

The weight is quantized symmetric per output channel (``quantize_weight``); at run time the
kernel quantizes A to uint8 per tensor (asymmetric, its own min/max) and runs ONNX Runtime's
u8s8 integer GEMM (MLAS QGEMM: VNNI on CPUs that have it, ``vpmaddubsw`` on AVX2), then
scales back to float and adds the bias. A following ``Add`` of a constant ``[N]`` vector is
folded into the kernel's bias input.

``weight_bits=7`` (reduce range: weights in [-63, 63]) avoids the int16 saturation of the
u8s8 ``vpmaddubsw`` path on x86-64 CPUs without VNNI (two u8*s8 products summed in int16 can
overflow with 8-bit weights); with VNNI (or on Arm) 8 bits are exact in the kernel.
``weight_bits_for_cpu`` picks it from the CPU flags. Which layers get the kernel is the
caller's choice (``only`` / ``min_elements``), made by timing and by the ranking budget.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx_ir as ir

from graph_passes.onnx._util import Refusal, add_initializer, const_array, node_name, tag
from graph_passes.onnx.quantize import MIN_K, quantize_weight, weight_refusal
from runtime.cpu import saturates_8bit_weights

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
KERNEL = "DynamicQuantizeMatMul"


def weight_bits_for_cpu(flags: Iterable[str]) -> int:
    """8 when the CPU has an int8 dot product (VNNI) or is not x86-64, else 7 (reduce range).

    ``flags``: the CPU's feature flags (``/proc/cpuinfo`` "flags" on Linux; the caller reads
    them, this module does no I/O). The rule is ``runtime.cpu.saturates_8bit_weights``, the
    same one the runtime uses to warn when 8-bit weights are served where they can saturate."""
    return 7 if saturates_8bit_weights(flags) else 8


class DynamicQuantizeMatMulPass(ir.passes.InPlacePass):
    """Replace constant-weight float32 MatMuls by ``com.microsoft.DynamicQuantizeMatMul``.

    Args:
        only: if given, only MatMuls whose node or weight name is listed.
        min_elements / min_k: weights smaller than this stay float (``weight_refusal``).
        weight_bits: 8, or 7 (reduce range, for u8s8 without VNNI; ``weight_bits_for_cpu``).
        fold_bias: fold a following ``Add(constant [N])`` into the kernel's bias input.

    After the call ``self.quantized`` lists (node name, weight name) of the layers converted
    and ``self.refusals`` the MatMuls left alone and why.
    """

    def __init__(
        self,
        only: Iterable[str] | None = None,
        min_elements: int = 0,
        min_k: int = MIN_K,
        weight_bits: int = 8,
        fold_bias: bool = True,
    ) -> None:
        super().__init__()
        if weight_bits not in (7, 8):
            from graph_passes.onnx.errors import PassError

            raise PassError(f"weight_bits must be 8 or 7 (reduce range), got {weight_bits}")
        self.only = None if only is None else set(only)
        self.min_elements, self.min_k = min_elements, min_k
        self.weight_bits, self.fold_bias = weight_bits, fold_bias
        self.quantized: list[tuple[str, str]] = []
        self.refusals: list[Refusal] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.quantized, self.refusals = [], []
        graph = model.graph
        packed: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}  # shared weights: quantized once
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain != "":
                continue
            reason = self._refusal(node)
            if reason is not None:
                self.refusals.append(Refusal(node_name(node), node.op_type, reason))
                continue
            self._convert(graph, node, packed)
        for b in packed:  # float weights no node reads any more
            if b.name in graph.initializers and not b.uses() and not b.is_graph_output():
                del graph.initializers[b.name]
        if self.quantized:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, bool(self.quantized))

    def _refusal(self, node: ir.Node) -> str | None:
        b = node.inputs[1]
        w = const_array(b)
        reason = weight_refusal(w, b.name or "", min_k=self.min_k, min_elements=self.min_elements)
        if reason is not None:
            return reason
        if self.only is not None and not {node.name, b.name} & self.only:
            return "not selected (only=...)"
        a = node.inputs[0]
        if a is None or a.dtype not in (None, ir.DataType.FLOAT):
            return "activation is not float32"
        return None

    def _convert(self, graph: ir.Graph, node: ir.Node, packed: dict) -> None:
        b = node.inputs[1]
        w = const_array(b)
        if b not in packed:
            qw = quantize_weight(w, bits=self.weight_bits)
            packed[b] = (
                add_initializer(graph, f"{b.name}_w8a8_q", qw.q),
                add_initializer(graph, f"{b.name}_w8a8_scale", qw.scale),
            )
        q, scale = packed[b]
        out = node.outputs[0]
        bias, add = self._bias(graph, node, w.shape[1]) if self.fold_bias else (None, None)
        new = ir.Node(
            MS_DOMAIN,
            KERNEL,
            [node.inputs[0], q, scale, None, bias] if bias is not None else [node.inputs[0], q, scale],
            name=f"{node_name(node)}_w8a8",
        )
        tag(new, self.__class__.__name__, weight=b.name or "", bits=str(self.weight_bits))
        graph.insert_before(node, new)
        result = new.outputs[0]
        final = add.outputs[0] if add is not None else out
        name, shape, typ = final.name, final.shape, final.type
        ir.convenience.replace_all_uses_with(final, result, replace_graph_outputs=True)
        for gone in (n for n in (add, node) if n is not None):
            for i in range(len(gone.inputs)):  # detach: the float weight loses its use
                gone.replace_input_with(i, None)
            graph.remove(gone, safe=False)
        final.name = None
        result.name, result.shape, result.type = name, shape, typ
        self.quantized.append((node_name(node), b.name or ""))

    def _bias(self, graph: ir.Graph, node: ir.Node, n: int) -> tuple[ir.Value | None, ir.Node | None]:
        """(bias value, the Add node) when the MatMul's only use is ``Add(out, const [N])``."""
        out = node.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output():
            return None, None
        add = uses[0].node
        if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
            return None, None
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        c = const_array(other)
        if c is None or c.dtype.name != "float32" or c.size != n or c.ndim < 1 or c.shape[-1] != n:
            return None, None
        if c.ndim > 1 and any(d != 1 for d in c.shape[:-1]):
            return None, None
        if c.ndim > 1:  # a [1, N] bias: the kernel wants [N]
            other = add_initializer(graph, f"{other.name}_bias", c.reshape(n))
        return other, add


def dynamic_quantize_matmuls(
    model: ir.Model,
    *,
    only: Iterable[str] | None = None,
    min_elements: int = 0,
    weight_bits: int = 8,
) -> DynamicQuantizeMatMulPass:
    """Run ``DynamicQuantizeMatMulPass`` on ``model`` in place; the pass (its record) back."""
    p = DynamicQuantizeMatMulPass(only=only, min_elements=min_elements, weight_bits=weight_bits)
    p(model)
    log.debug("w8a8: %d layer(s) converted, %d left", len(p.quantized), len(p.refusals))
    return p
