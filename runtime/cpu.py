"""This machine's CPU, as the speed and int8 choices see it (``/proc/cpuinfo``; no I/O beyond it).

The export's speed tuning (exporter/timing.py) and the benchmarks record ``cpu_summary()``;
``load`` uses ``int8_saturation_warning`` to say when a w8a8 bundle exported with 8-bit
weights on a CPU with an int8 dot product (VNNI) is served on an x86-64 CPU without one:
there ONNX Runtime's u8s8 GEMM runs ``vpmaddubsw``, whose int16 pair sums can saturate with
8-bit weights (the export would have chosen 7-bit weights on such a CPU).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from typing import Any

# int8 dot-product flags, in the order cpu_summary reports them (Linux spells them with an
# underscore; the unspaced spellings are other tools')
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni", "avxvnni")


def _cpuinfo(key: str) -> str | None:
    """The first ``key`` line's value in ``/proc/cpuinfo`` (None when absent or unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU feature flags (empty when ``/proc/cpuinfo`` says none)."""
    return (_cpuinfo("flags") or "").split()


def cpu_summary(name: str | None = None, flags: Iterable[str] | None = None) -> dict[str, Any]:
    """What a speed figure depends on, for benchmark JSON: the CPU's name, its widest float
    SIMD (``avx512`` / ``avx2`` / ``other``), its int8 dot-product instruction (``avx512_vnni``,
    ``avx_vnni``, ``amx_int8`` or None: ONNX Runtime's u8s8 GEMM then runs ``vpmaddubsw`` and
    w8a8 uses 7-bit weights) and whether it has bf16 arithmetic. Defaults read this machine."""
    name = cpu_name() if name is None else name
    f = set(cpu_flags() if flags is None else flags)
    simd = "avx512" if "avx512f" in f else "avx2" if "avx2" in f else "other"
    dot = next((d for d in INT8_DOT if d in f), None)
    return {"name": name, "simd": simd, "int8_dot": dot,
            "bf16": bool(f & {"avx512_bf16", "amx_bf16", "bf16"})}


def saturates_8bit_weights(flags: Iterable[str]) -> bool:
    """True on x86-64 without an int8 dot product (u8s8 GEMM via ``vpmaddubsw``)."""
    f = set(flags)
    return bool(f & {"avx2", "sse4_2", "avx"}) and not f.intersection(INT8_DOT)


def int8_saturation_warning(quantization: Any, flags: Iterable[str] | None = None) -> str | None:
    """A warning when a w8a8 bundle's 8-bit weights meet a CPU that can saturate them, else None.

    ``quantization``: the manifest's ``quantization`` section (or None)."""
    if quantization is None or getattr(quantization, "precision", None) != "w8a8":
        return None
    scheme = quantization.scheme if isinstance(quantization.scheme, dict) else {}
    if scheme.get("weight_bits") != 8:
        return None
    flags = cpu_flags() if flags is None else flags
    if not saturates_8bit_weights(flags):
        return None
    return ("this w8a8 bundle has 8-bit int8 weights, chosen on an export CPU with an int8 dot "
            "product (VNNI); this CPU has none, so ONNX Runtime's u8s8 GEMM (vpmaddubsw) can "
            "saturate int16 sums and score some candidates wrongly. Re-export it on this machine "
            "(it picks 7-bit weights here) or serve it on a CPU with VNNI.")
