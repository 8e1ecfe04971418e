"""How much of the split's N=16 ceiling memory bandwidth allows: the user graph's weight-stream floor.

The FLOP ceiling ``(U+G) / (U/N + G)`` assumes time follows FLOPs. At M=1 the user graph does
U FLOPs but reads every weight of its matrices once, so it cannot run faster than those bytes
stream from memory. This module measures that floor on the machine and turns it into a bound
on ``fraction_of_ceiling`` at one N:

- ``weight_bytes(path)``: bytes of the stage graph's initializers read whole on every call
  (every constant input of a node other than a Gather's table: a lookup reads rows only);
- ``stream_ms``: the median time of one ONNX Runtime ``MatMul`` [1, 4096] x [4096, K] holding
  the same bytes (fp32), same threads, interleaved call by call with the user graph at M=1 so
  each finds the other's bytes in the caches, as the split does between requests;
- the bound: with the full graph's measured rate ``r = N(U+G) / t_full`` FLOPs per ms, the
  split takes at least ``max(U/r, stream_ms) + N·G/r``, so its speedup is at most
  ``t_full / that`` and its fraction of the ceiling at most that speedup over the ceiling.
  ``1.0`` when the user's FLOPs, not its bytes, are the larger cost.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

_K = 4096


def weight_bytes(path: str | Path) -> int:
    """Bytes of ``path``'s initializers that a call reads whole (not a Gather's table)."""
    model = onnx.load(str(path), load_external_data=False)
    sizes = {}
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        sizes[init.name] = n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    read: set[str] = set()
    for node in model.graph.node:
        ins = list(node.input)[1:] if node.op_type == "Gather" else list(node.input)
        read.update(x for x in ins if x in sizes)
    return sum(sizes[x] for x in read)


def stream_session(nbytes: int, threads: int) -> ort.InferenceSession:
    """One fp32 ``MatMul`` [1, 4096] x [4096, K] whose weight holds ``nbytes``: input ``x``."""
    cols = max(1, nbytes // (4 * _K))
    w = np.random.default_rng(0).standard_normal((_K, cols), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "stream",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def stream_call(nbytes: int, threads: int):
    """A call that streams ``nbytes`` of fp32 weights once (``stream_session``, fed ones)."""
    sess = stream_session(nbytes, threads)
    x = np.ones((1, _K), dtype=np.float32)
    return lambda: sess.run(None, {"x": x})


def interleaved_medians(calls: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each of ``calls`` (name -> callable): each run once to warm
    up, then every call once per round, the order alternating round by round."""
    for f in calls.values():
        f()
    samples: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            calls[k]()
            samples[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in samples.items()}


def stream_floor(user_call, nbytes: int, threads: int, repeats: int = 200) -> dict:
    """Median ms of the user graph at M=1 (``user_call()``) and of streaming ``nbytes``."""
    runs = {"user_m1": user_call, "stream": stream_call(nbytes, threads)}
    med = {k: v * 1000 for k, v in interleaved_medians(runs, repeats).items()}
    return {"user_weight_bytes": nbytes, "threads": threads, "repeats": repeats,
            "user_m1_ms": med["user_m1"], "stream_ms": med["stream"],
            "stream_gb_per_s": nbytes / med["stream"] / 1e6,
            "stream_share_of_user_m1": med["stream"] / med["user_m1"]}


def fraction_bound(row: dict, flops: dict, stream_ms: float) -> float:
    """The highest ``fraction_of_ceiling`` the split can reach at ``row['n']`` (see module doc)."""
    n, u, g = row["n"], flops["user_per_row"], flops["group_per_row"]
    rate = n * (u + g) / row["full_ms"]
    split_min = max(u / rate, stream_ms) + n * g / rate
    return min(1.0, row["full_ms"] / split_min / row["ceiling"])
