"""TensorRT engines as a runtime backend (no torch; ``tensorrt`` and CUDA imported lazily).

    runtime.load(bundle, backend="tensorrt")

Picks the engine the bundle carries for the GPU in this machine and the installed TensorRT
(``manifest.engines``: ``engines/<gpu-slug>-trt<version>/{user,group,full}.plan``, each with
its GPU model, compute capability and TensorRT version) and refuses, saying what it found,
an engine built for another GPU or TensorRT version: a TensorRT plan is only valid on the
TensorRT version that built it and, by default, on the GPU model it was built for.

Inference follows the TensorRT 10 Python API
(https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html,
"Performing Inference"): ``trt.Runtime(logger).deserialize_cuda_engine(plan)``,
``engine.num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode`` / ``get_tensor_dtype``,
``context.set_input_shape`` for the dynamic batch dims (M users, N candidates),
``context.set_tensor_address`` and ``context.execute_async_v3(stream)``. Device memory and
streams come from cuda-python's runtime bindings (``cudaMalloc``, ``cudaMemcpyAsync``,
``cudaStreamCreate``), as TensorRT's own samples do since 10.13 ("Replace all pycuda usages
with cuda-python APIs", NVIDIA/TensorRT CHANGELOG 10.14;
https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html).
"""

from __future__ import annotations

import logging
import re

import numpy as np

from runtime.errors import BackendUnavailableError, BundleError
from runtime.manifest import Engine

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ugsep[gpu]' (tensorrt-cu12 + cuda-python 12) on a machine with an NVIDIA GPU"


def import_tensorrt():
    """The ``tensorrt`` module, or BackendUnavailableError saying what to install."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailableError(f"tensorrt is not installed ({e}); {INSTALL_HINT}") from e
    return tensorrt


def import_cudart():
    """cuda-python's CUDA runtime bindings (new ``cuda.bindings`` layout, else ``cuda``)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise BackendUnavailableError(
                f"cuda-python is not installed ({e}); {INSTALL_HINT}"
            ) from e
    return cudart


def _code(err) -> int:
    return int(getattr(err, "value", err))


def cuda_call(result):
    """Unwrap a cuda-python ``(err, *values)`` tuple, raising on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if _code(err) != 0:
        raise BackendUnavailableError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_info(device: int = 0) -> dict:
    """{"gpu": model name, "compute_capability": "8.9"} of CUDA device ``device``.

    Raises BackendUnavailableError when cuda-python, the driver or a GPU is missing.
    """
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if _code(err) != 0 or count == 0:
        raise BackendUnavailableError(f"no NVIDIA GPU is visible to CUDA ({err}); {INSTALL_HINT}")
    prop = cuda_call(cudart.cudaGetDeviceProperties(device))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}"}


def engine_dir_name(gpu: str, trt_version: str) -> str:
    """``engines/<gpu-slug>-trt<version>``: where a bundle keeps the engines for one GPU."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "gpu"
    return f"engines/{slug}-trt{trt_version}"


def select_engine(bundle, gpu: dict, trt_version: str) -> Engine:
    """The manifest engine entry built for this GPU model and TensorRT version, or refuse."""
    engines = bundle.manifest.engines
    if not engines:
        raise BackendUnavailableError(
            f"bundle '{bundle.root}' has no TensorRT engines; build them on this GPU with "
            f"`ugsep build-trt {bundle.root}`"
        )
    for eng in engines:
        if (
            eng.gpu == gpu["gpu"]
            and eng.compute_capability == gpu["compute_capability"]
            and eng.trt_version == trt_version
        ):
            return eng
    built = "; ".join(
        f"{e.gpu} (sm {e.compute_capability}, TensorRT {e.trt_version})"
        for e in engines
    )
    raise BackendUnavailableError(
        f"bundle '{bundle.root}' has no TensorRT engine for this machine: it has {built}, this "
        f"is {gpu['gpu']} (sm {gpu['compute_capability']}) with TensorRT {trt_version}. A plan "
        f"only runs on the GPU model and TensorRT version that built it; run `ugsep build-trt "
        f"{bundle.root}` here, or use backend='onnxruntime'/'ort-cuda'"
    )


class TrtBackend:
    """TensorRT engines from the bundle, for the GPU in this machine."""

    name = "tensorrt"
    needs_gpu = True
    group_chunk_candidates = 0  # a GPU wants the whole group call at once

    def __init__(self, device: int = 0) -> None:
        self.device = device

    @classmethod
    def availability(cls, bundle=None) -> str | None:
        """None when this machine can run the bundle's engines, else why not (fast, no crash)."""
        try:
            trt = import_tensorrt()
            gpu = gpu_info()
            if bundle is not None:
                select_engine(bundle, gpu, trt.__version__)
        except BackendUnavailableError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - a broken CUDA install must not crash "auto"
            return f"TensorRT/CUDA could not be initialised: {type(e).__name__}: {e}"
        return None

    def open(self, bundle, stage: str) -> TrtSession:
        trt = import_tensorrt()
        eng = select_engine(bundle, gpu_info(self.device), trt.__version__)
        path = bundle.root / eng.dir / f"{stage}.plan"
        if not path.is_file():
            raise BundleError(f"bundle '{bundle.root}': engine '{eng.dir}' has no {stage}.plan")
        return TrtSession(path.read_bytes(), device=self.device, where=str(path))


def _make_logger(trt):
    class _Logger(trt.ILogger):
        """Routes TensorRT messages to Python logging (ILogger subclass, per the API docs)."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            level = (
                logging.ERROR
                if int(severity) <= int(trt.ILogger.Severity.ERROR)
                else (
                    logging.WARNING
                    if int(severity) == int(trt.ILogger.Severity.WARNING)
                    else logging.DEBUG
                )
            )
            log.log(level, "TensorRT: %s", msg)

    return _Logger()


class TrtSession:
    """One deserialized engine: dict-in, dict-out ``run`` with dynamic batch dims."""

    def __init__(self, plan: bytes, *, device: int = 0, where: str = "engine") -> None:
        trt, self._cudart = import_tensorrt(), import_cudart()
        cuda_call(self._cudart.cudaSetDevice(device))
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendUnavailableError(
                f"TensorRT could not deserialize '{where}' (built by another TensorRT version "
                "or for another GPU?); rebuild it with `ugsep build-trt`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._stream = cuda_call(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device ptr, bytes)

    def _device_buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:  # grow-only: steady-state serving allocates nothing
            if ptr:
                cuda_call(self._cudart.cudaFree(ptr))
            ptr, size = cuda_call(self._cudart.cudaMalloc(max(nbytes, 1))), max(nbytes, 1)
            self._buffers[name] = (ptr, size)
        return ptr

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, h2d = self._cudart, self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        keep = []  # host arrays must outlive the async copies
        for name in self.input_names:
            host = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            keep.append(host)
            self.context.set_input_shape(name, host.shape)
            ptr = self._device_buffer(name, host.nbytes)
            cuda_call(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, self._stream))
            self.context.set_tensor_address(name, ptr)
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = np.empty(shape, dtype=self.dtypes[name])
            self.context.set_tensor_address(name, self._device_buffer(name, outs[name].nbytes))
        if not self.context.execute_async_v3(int(self._stream)):
            raise BackendUnavailableError("TensorRT execute_async_v3 failed (see the log)")
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, host in outs.items():
            ptr = self._buffers[name][0]
            cuda_call(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, d2h, self._stream))
        cuda_call(cudart.cudaStreamSynchronize(self._stream))
        del keep
        return {n: (a.astype(np.float32) if a.dtype == np.float16 else a) for n, a in outs.items()}

    def __del__(self) -> None:
        cudart = getattr(self, "_cudart", None)
        for ptr, _ in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(ptr)
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
