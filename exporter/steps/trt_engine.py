"""``EngineFromOnnx``: one ONNX graph -> one serialized TensorRT engine (``tensorrt`` lazily).

Follows the TensorRT 10 Python API as documented in
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html
("The Build Phase": a ``trt.ILogger`` subclass, ``trt.Builder``, ``builder.create_network(flags)``,
``trt.OnnxParser(network, logger).parse``, ``builder.create_builder_config()``,
``config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, ...)``,
``builder.build_serialized_network(network, config)``), dynamic shapes via
``builder.create_optimization_profile()`` + ``profile.set_shape(name, min, opt, max)`` +
``config.add_optimization_profile`` (Developer Guide, "Working with Dynamic Shapes"),
strongly typed networks via ``1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)``
(https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html)
and the timing cache via ``config.create_timing_cache(bytes)`` / ``config.set_timing_cache`` /
``ITimingCache.serialize()`` (Developer Guide, "Optimizing Builder Performance: Timing Cache";
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/TimingCache.html).

Precision: an fp32 bundle builds a weakly typed network with ``BuilderFlag.FP16`` (TensorRT
picks fp16 kernels where it is faster); a quantized bundle (DequantizeLinear on int8 weights,
fp16 activations written into the graph by ``Fp16ActivationsPass``) builds a STRONGLY_TYPED
network, in which the graph's own types decide the precision and precision flags are not
allowed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import ExportError

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BatchRange:
    """min/opt/max of one dynamic batch dimension (M users or N candidates)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ExportError(
                f"batch range {self.min}/{self.opt}/{self.max} must satisfy 1 <= min <= opt <= max"
            )

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """'1,8,256' -> BatchRange(1, 8, 256)."""
        try:
            lo, opt, hi = (int(x) for x in text.split(","))
        except ValueError as e:
            raise ExportError(f"batch range '{text}' is not 'min,opt,max' integers") from e
        return cls(lo, opt, hi)


@dataclass
class BuildOptions:
    """How to build: precision mode, strong typing, workspace, timing cache, log file."""

    fp16: bool = True  # weakly typed networks only
    strongly_typed: bool = False
    workspace_bytes: int | None = None
    timing_cache: Path | None = None
    log_path: Path | None = None
    profiles: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)


def _make_capture_logger(trt, log_path: Path | None):
    class CaptureLogger(trt.ILogger):
        """Keeps every TensorRT message (the build log) and mirrors warnings to logging."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []
            self._file = open(log_path, "a") if log_path else None  # noqa: SIM115

        def log(self, severity, msg) -> None:
            line = f"[{str(severity).rsplit('.', 1)[-1]}] {msg}"
            self.lines.append(line)
            if self._file:
                self._file.write(line + "\n")
                self._file.flush()
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                log.warning("TensorRT: %s", msg)

        def close(self) -> None:
            if self._file:
                self._file.close()

    return CaptureLogger()


class EngineFromOnnx:
    """Builds a serialized engine (bytes) from an ONNX file; call it to build."""

    def __init__(self, onnx_path: str | Path, options: BuildOptions) -> None:
        self.onnx_path = Path(onnx_path)
        self.options = options

    def __call__(self) -> bytes:
        import tensorrt as trt

        o = self.options
        logger = _make_capture_logger(trt, o.log_path)
        try:
            builder = trt.Builder(logger)
            flags = self._network_flags(trt)
            network = builder.create_network(flags)
            self._parse(trt, network, logger)
            config = self._config(trt, builder, network)
            cache = self._attach_timing_cache(config)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                tail = "\n".join(logger.lines[-20:])
                raise ExportError(f"TensorRT failed to build '{self.onnx_path.name}':\n{tail}")
            self._save_timing_cache(cache)
            return bytes(plan)
        finally:
            logger.close()

    def _network_flags(self, trt) -> int:
        # TensorRT 11 is always strongly typed (the flag is deprecated and ignored there)
        if self.options.strongly_typed and _major(trt.__version__) < 11:
            return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return 0

    def _parse(self, trt, network, logger) -> None:
        parser = trt.OnnxParser(network, logger)
        # parse_from_file resolves external weights next to the model
        if not parser.parse_from_file(str(self.onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ExportError(
                f"TensorRT's ONNX parser rejected '{self.onnx_path}':\n  "
                + "\n  ".join(errors)
                + "\nrun `ugsep check --trt-lint` for the producing model code and fixes"
            )

    def _config(self, trt, builder, network):
        o = self.options
        config = builder.create_builder_config()
        if o.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, o.workspace_bytes)
        if o.fp16 and not o.strongly_typed:
            if _major(trt.__version__) >= 11:  # no weakly typed networks, no FP16 flag
                log.warning(
                    "TensorRT %s is always strongly typed: the fp32 graph builds in "
                    "fp32 (export an fp16 graph for fp16 kernels)",
                    trt.__version__,
                )
            else:
                config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            if name not in o.profiles:
                raise ExportError(
                    f"no optimization profile for input '{name}' of '{self.onnx_path.name}'"
                )
            profile.set_shape(name, *o.profiles[name])
        config.add_optimization_profile(profile)
        return config

    def _attach_timing_cache(self, config):
        path = self.options.timing_cache
        data = path.read_bytes() if path and path.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
        return cache

    def _save_timing_cache(self, cache) -> None:
        path = self.options.timing_cache
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(bytes(cache.serialize()))
        tmp.replace(path)


def _major(version: str) -> int:
    return int(version.split(".")[0])


def input_profiles(
    inputs: dict[str, Shape], m_inputs: set[str], m: BatchRange, n: BatchRange
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """min/opt/max shapes per input: dim 0 from the M range (``m_inputs``) or the N range.

    ``inputs`` maps each graph input to its non-batch dims (dims 1..).
    """
    out = {}
    for name, rest in inputs.items():
        r = m if name in m_inputs else n
        out[name] = ((r.min, *rest), (r.opt, *rest), (r.max, *rest))
    return out
