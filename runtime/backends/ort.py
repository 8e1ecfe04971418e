"""ONNX Runtime backends: CPU, and the CUDA / TensorRT execution providers."""

from __future__ import annotations

import logging
import os

import numpy as np

from runtime.errors import BackendUnavailableError

log = logging.getLogger(__name__)


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from e
    return onnxruntime


def _no_gpu_reason() -> str | None:
    """None when the CUDA driver sees a GPU, else why not (driver API via ctypes: no deps)."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found): no GPU on this machine"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return "the NVIDIA driver reports no usable GPU (cuInit/cuDeviceGetCount failed)"
    return None if count.value > 0 else "the NVIDIA driver reports 0 GPUs"


THREAD_POOLS = ("session", "process")
_process_pool: dict[str, int] = {}  # {"threads": n} once this process's shared pool exists


def process_thread_pool(threads: int | None) -> int:
    """Create (once per process) ONNX Runtime's process-wide intra-op thread pool that every
    session opened with ``thread_pool="process"`` shares; returns its size.

    Why: a split bundle runs its user and group sessions back to back. With a pool per
    session, idle workers must not spin (they would steal the cores the other session is
    running on: ``allow_spinning`` below), so every parallel node of a small-batch graph pays
    a thread wake-up. One shared pool can spin (ORT's default for it) without stealing from a
    sibling session. Measured on the ``bench`` RankMixer, 2 threads (docs/split-efficiency.md):
    split at N=16 ~0.65x the time, full graph ~0.68x, N=512 ~0.9x. The pool is the
    process's: its size is fixed at first use, and sessions cannot have their own thread
    counts (the manifest's per-stage ``intra_op_threads`` does not apply)."""
    want = threads or (os.cpu_count() or 1)
    have = _process_pool.get("threads")
    if have is None:
        try:
            _ort().capi._pybind_state.set_global_thread_pool_sizes(want, 1)
        except Exception as e:  # noqa: BLE001 - ORT raises a plain RuntimeError / Fail
            raise BackendUnavailableError(
                "cannot create ONNX Runtime's process-wide thread pool in this process "
                f"(another library created it first?): {e}"
            ) from e
        _process_pool["threads"] = want
        return want
    if have != want:
        raise BackendUnavailableError(
            f"this process's shared ONNX Runtime thread pool has {have} intra-op threads; "
            f"a backend asked for {want}: use one thread count per process with "
            "thread_pool='process'"
        )
    return have


def capped_threads(threads: int | None, cap: int | None) -> int | None:
    """Intra-op threads under a stage's cap (None/0 threads: ORT's default, which the cap
    replaces; None cap: no cap)."""
    return min(threads or cap, cap) if cap else threads


class OrtSession:
    """An ``onnxruntime.InferenceSession`` with dict-in, dict-out ``run``."""

    def __init__(self, path: str, providers: list, options) -> None:
        ort = _ort()
        self.path = path
        self._sess = ort.InferenceSession(path, sess_options=options, providers=providers)
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.providers = self._sess.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._sess.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))


class OrtBackend:
    """ONNX Runtime on the CPU: the default backend, available everywhere."""

    name = "onnxruntime"
    providers: tuple = ("CPUExecutionProvider",)
    needs_gpu = False
    # the batcher's group calls: on CPU a few hundred candidates per call cost the least per
    # candidate (bench RankMixer, 1 thread: 1.2x at 1024, 1.26x at 3200 vs 256); GPUs want one call
    group_chunk_candidates = 256

    # ORT's fused SkipLayerNormalization CPU kernel measured ~6x slower than the Add +
    # LayerNormalization it replaces on [512, 8, 128] (bench RankMixer, 2 threads): ~25% of
    # the group graph. Keeping the two ops is exact to fp32 rounding.
    DISABLED_OPTIMIZERS: tuple[str, ...] = ("SkipLayerNormFusion",)

    def __init__(
        self,
        intra_op_threads: int | None = None,
        inter_op_threads: int = 1,
        *,
        allow_spinning: bool = False,
        disabled_optimizers: tuple[str, ...] | None = None,
        stage_threads: bool = True,
        thread_pool: str = "session",
    ) -> None:
        """``allow_spinning`` (default off): ORT's idle intra-op threads busy-wait for work.
        A split bundle runs two sessions back to back, each with its own pool, so on a small
        CPU the idle pool's spinning steals cores from the running one (measured on 2 cores:
        split speedup at N=512 2.6x with spinning, 4.1-5.1x without). Turn it on only for a
        single session on dedicated cores. ``stage_threads`` (default on): run a stage whose
        manifest entry has ``intra_op_threads`` on at most that many threads (the export
        timed the small-batch stages faster on fewer threads than they are served with).
        ``thread_pool``: ``"session"`` (default) gives each session its own intra-op pool;
        ``"process"`` shares one spinning pool of ``intra_op_threads`` across every session of
        the process (``process_thread_pool``; ``stage_threads`` and ``allow_spinning`` then do
        not apply).
        """
        if thread_pool not in THREAD_POOLS:
            raise ValueError(f"thread_pool must be one of {THREAD_POOLS}, got {thread_pool!r}")
        self.thread_pool = thread_pool
        self.stage_threads = stage_threads
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.allow_spinning = allow_spinning
        self.disabled_optimizers = (
            self.DISABLED_OPTIMIZERS if disabled_optimizers is None else tuple(disabled_optimizers)
        )

    @classmethod
    def availability(cls, bundle=None) -> str | None:
        try:
            ort = _ort()
        except BackendUnavailableError as e:
            return str(e)
        missing = [p for p in cls.providers if p not in ort.get_available_providers()]
        if missing:
            return f"onnxruntime has no {', '.join(missing)} (install ugsep[gpu] on a GPU machine)"
        if cls.needs_gpu:
            # onnxruntime-gpu lists the CUDA/TensorRT providers whether or not a GPU exists
            return _no_gpu_reason()
        return None

    def session_options(self, max_threads: int | None = None):
        """ORT session options; ``max_threads`` caps the intra-op threads (a stage's
        ``intra_op_threads`` from the manifest)."""
        ort = _ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = capped_threads(self.intra_op_threads, max_threads)
        if self.thread_pool == "process":
            process_thread_pool(self.intra_op_threads)
            so.use_per_session_threads = False
        elif "threads" in _process_pool:
            raise BackendUnavailableError(
                "this process shares one ONNX Runtime thread pool (thread_pool='process'), "
                "so every session must use it: open this one with thread_pool='process' too"
            )
        elif threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = self.inter_op_threads
        so.log_severity_level = 3
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.allow_spinning else "0"
        )
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.disabled_optimizers:
            so.add_session_config_entry(
                "optimization.disable_specified_optimizers", ",".join(self.disabled_optimizers)
            )
        return so

    def open(self, bundle, stage: str) -> OrtSession:
        """A session for ``stage``; on the CPU with at most the stage's ``intra_op_threads``
        (timed at export: exporter/steps/threads.py) unless ``stage_threads=False``."""
        cap = None
        if self.stage_threads and not self.needs_gpu:
            cap = bundle.manifest.stage_threads(stage)
        return self.open_path(str(bundle.stage_path(stage)), max_threads=cap)

    def open_path(self, path: str, max_threads: int | None = None) -> OrtSession:
        return OrtSession(path, list(self.providers), self.session_options(max_threads))


class OrtCudaBackend(OrtBackend):
    """ONNX Runtime with the CUDA execution provider (needs onnxruntime-gpu and a GPU)."""

    name = "ort-cuda"
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    needs_gpu = True
    group_chunk_candidates = 0


class OrtTensorrtBackend(OrtBackend):
    """ONNX Runtime with the TensorRT execution provider (needs onnxruntime-gpu + TensorRT)."""

    name = "ort-tensorrt"
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    needs_gpu = True
    group_chunk_candidates = 0
