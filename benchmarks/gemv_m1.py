"""What an fp32 user graph at batch 1 could cost at best: GEMV rates, per-token layouts, and the bound they put on the N=16 split.

    .venv/bin/python benchmarks/gemv_m1.py --bundle /tmp/bsplit/bundle      # ~2 min
    .venv/bin/python benchmarks/gemv_m1.py                                 # the microbenchmarks only

Issue 25 asks the split to reach 0.8 of its FLOP ceiling at N=16 (``fraction_of_ceiling_n16``
in bench_split.json). At M=1 the user graph is a chain of matrix-vector products: it reads
every weight once for 2 FLOPs each, so its time is set by how fast a kernel streams weights,
not by FLOPs. This script measures, on this machine, with every variant interleaved round by
round (medians):

- ``gemv_gb_per_s``: [1, 1024] x [1024, 1024] float32 on 32 distinct matrices (128 MB, so
  each call reads from memory, as the user graph's 34 MB do past the L3 of a loaded server),
  by ONNX Runtime ``MatMul`` (B prepacked, its default), the same without prepacking
  (``session.disable_prepacking``, which MLAS would send to its GEMV kernel), numpy (the
  BLAS it was built with) and ``torch.nn.functional.linear``;
- ``per_token_ms``: the RankMixer per-token FFN (8 tokens, each its own [128, 512] and
  [512, 128] weights, 16 layers) as the export writes it (one ``MatMul`` per token) and as one
  batched ``MatMul`` over a [8, 128, 512] weight, at M=1 (the user stage) and M=16;
- with ``--bundle``: the bundle's stages through the runtime's ORT session options (spinning
  off) at 1 and 2 threads: full and group at N=16, user at M=1, interleaved; where the user
  graph's kernel time goes (GEMMs or the rest, ORT's profiler); and
  ``fraction_of_ceiling_n16_best_gemv_bound``: the fraction the split would reach if every
  user weight streamed at the best GEMV rate above and no other user node cost anything,
  with the group graph and the full graph each at its own better thread count. If that bound
  is below the goal, no user-graph rewrite on these kernels reaches it;
  ``roofline`` / ``fraction_of_ceiling_n16_roofline``: the same with no kernel assumption at
  all: per thread count, the user stage costs one ``MatMul`` streaming the user graph's weight
  bytes (``stream_t1``/``stream_t2``, interleaved with the stages) and the group stage runs at
  the full graph's own FLOP rate; with the user-stage time 0.8 leaves beside the group stage
  as measured (``user_ms_for_0_8``), to set against that stream time; and
  ``group_boundary_free``: the group graph's nodes and contraction FLOPs that need no boundary
  tensor, i.e. what could run on the other core while the user stage streams its weights.

Writes ``benchmarks/results/gemv_m1.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_stage import _only, profile, session, stage_feeds  # noqa: E402
from stream_floor import fraction_bound, interleaved_medians, stream_call, weight_bytes  # noqa: E402

from runtime.ceiling import flop_ceiling  # noqa: E402
from runtime.cpu import cpu_summary  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402

GEMM_OPS = ("MatMul", "Gemm", "FusedGemm", "FusedMatMul", "MatMulNBits", "DynamicQuantizeMatMul")


def _session(model, threads: int, prepack: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "m", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def gemv_rates(threads: int, rounds: int, k: int = 1024, n: int = 1024, count: int = 32) -> dict:
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((k, n), dtype=np.float32) for _ in range(count)]
    x = rng.standard_normal((1, k), dtype=np.float32)
    model = _model(
        [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(count)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(count)],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)],
    )
    packed, unpacked = _session(model, threads), _session(model, threads, prepack=False)
    wt = [torch.from_numpy(np.ascontiguousarray(w.T)) for w in ws]  # linear's [out, in]
    xt = torch.from_numpy(x)
    ref = np.concatenate([x @ w for w in ws], 1)
    for sess in (packed, unpacked):  # same products, or the rates compare nothing
        got = np.concatenate(sess.run(None, {"x": x}), 1)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)

    def numpy_gemv():
        for w in ws:
            x @ w

    def torch_linear():
        with torch.inference_mode():
            for w in wt:
                torch.nn.functional.linear(xt, w)

    med = interleaved_medians({
        "onnxruntime_matmul": lambda: packed.run(None, {"x": x}),
        "onnxruntime_matmul_no_prepack": lambda: unpacked.run(None, {"x": x}),
        "numpy": numpy_gemv,
        "torch_linear": torch_linear,
    }, rounds)
    nbytes = count * k * n * 4
    return {"shape": [1, k, n], "matrices": count, "threads": threads, "rounds": rounds,
            "gb_per_s": {v: round(nbytes / s / 1e9, 2) for v, s in med.items()}}


def per_token_layouts(threads: int, rounds: int, m: int, tokens: int = 8, d: int = 128,
                      f: int = 512, layers: int = 16) -> dict:
    """The per-token FFN unrolled (one MatMul per token) vs batched (one MatMul per layer)."""
    rng = np.random.default_rng(1)
    w1 = [rng.standard_normal((tokens, d, f), dtype=np.float32) * 0.05 for _ in range(layers)]
    b1 = [rng.standard_normal((tokens, f), dtype=np.float32) * 0.05 for _ in range(layers)]
    w2 = [rng.standard_normal((tokens, f, d), dtype=np.float32) * 0.05 for _ in range(layers)]
    x_in = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, tokens, d])]
    y_out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]

    nodes = [helper.make_node("Split", ["x"], [f"s{t}" for t in range(tokens)], axis=1,
                              num_outputs=tokens)]
    inits = [numpy_helper.from_array(np.array([m, d], np.int64), "md")]
    cur = []
    for t in range(tokens):
        nodes.append(helper.make_node("Reshape", [f"s{t}", "md"], [f"r{t}"]))
        cur.append(f"r{t}")
    for layer in range(layers):
        for t in range(tokens):
            p = f"{layer}_{t}"
            inits += [numpy_helper.from_array(w1[layer][t], f"w1_{p}"),
                      numpy_helper.from_array(b1[layer][t], f"b1_{p}"),
                      numpy_helper.from_array(w2[layer][t], f"w2_{p}")]
            nodes += [helper.make_node("MatMul", [cur[t], f"w1_{p}"], [f"h_{p}"]),
                      helper.make_node("Add", [f"h_{p}", f"b1_{p}"], [f"hb_{p}"]),
                      helper.make_node("Relu", [f"hb_{p}"], [f"a_{p}"]),
                      helper.make_node("MatMul", [f"a_{p}", f"w2_{p}"], [f"o_{p}"])]
            cur[t] = f"o_{p}"
    nodes.append(helper.make_node("Concat", cur, ["y"], axis=1))  # [m, tokens * d]
    unrolled = _model(nodes, x_in, y_out, inits)

    nodes = [helper.make_node("Transpose", ["x"], ["c"], perm=[1, 0, 2])]  # [tokens, m, d]
    inits, cur = [], "c"
    for layer in range(layers):
        inits += [numpy_helper.from_array(w1[layer], f"w1_{layer}"),
                  numpy_helper.from_array(b1[layer][:, None, :], f"b1_{layer}"),
                  numpy_helper.from_array(w2[layer], f"w2_{layer}")]
        nodes += [helper.make_node("MatMul", [cur, f"w1_{layer}"], [f"h{layer}"]),
                  helper.make_node("Add", [f"h{layer}", f"b1_{layer}"], [f"hb{layer}"]),
                  helper.make_node("Relu", [f"hb{layer}"], [f"a{layer}"]),
                  helper.make_node("MatMul", [f"a{layer}", f"w2_{layer}"], [f"o{layer}"])]
        cur = f"o{layer}"
    inits.append(numpy_helper.from_array(np.array([m, tokens * d], np.int64), "flat"))
    nodes += [helper.make_node("Transpose", [cur], ["t"], perm=[1, 0, 2]),
              helper.make_node("Reshape", ["t", "flat"], ["y"])]
    batched = _model(nodes, x_in, y_out, inits)

    x = rng.standard_normal((m, tokens, d), dtype=np.float32)
    su, sb = _session(unrolled, threads), _session(batched, threads)
    np.testing.assert_allclose(su.run(None, {"x": x})[0], sb.run(None, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)
    med = interleaved_medians({"unrolled": lambda: su.run(None, {"x": x}),
                        "batched": lambda: sb.run(None, {"x": x})}, rounds)
    nbytes = sum(w.nbytes for w in w1 + w2)
    return {"m": m, "threads": threads, "weight_bytes": nbytes,
            "ms": {k: round(v * 1e3, 4) for k, v in med.items()},
            "gb_per_s": {k: round(nbytes / v / 1e9, 2) for k, v in med.items()},
            "batched_over_unrolled": round(med["batched"] / med["unrolled"], 3)}


def best_gemv_bound(full_ms: float, group_ms: float, user_bytes: int, gb_per_s: float,
                    ceiling: float) -> dict[str, float]:
    """The split's fraction of ``ceiling`` if the user stage cost only streaming ``user_bytes``
    at ``gb_per_s`` (no other node), beside the measured group and full times; and the group
    time that would give 0.8 with that user stage."""
    user_ms = user_bytes / (gb_per_s * 1e9) * 1e3
    return {"user_ms": user_ms,
            "fraction": min(1.0, full_ms / (user_ms + group_ms) / ceiling),
            "group_ms_for_0_8": full_ms / (0.8 * ceiling) - user_ms}


def roofline_bounds(med: dict[str, float], n: int, ceiling: float, user_per_row: float,
                    group_per_row: float, user_bytes: int) -> dict[str, dict[str, float]]:
    """Per thread count t, from the interleaved medians ``med`` (ms; keys ``full_t{t}``,
    ``group_t{t}`` and ``stream_t{t}``): the highest fraction of ``ceiling`` the split can reach
    at ``n`` if its user stage cost only streaming ``user_bytes`` (the ``stream_t{t}`` MatMul)
    and its group stage ran at the full graph's own FLOP rate at t threads
    (``stream_floor.fraction_bound``). Kernels that made the group graph faster would make the
    full graph faster too, so this is the memory roofline of the comparison itself, not of one
    graph's kernels. Also the user-stage time that 0.8 leaves beside the group stage as
    measured (``user_ms_for_0_8``), to set against ``stream_ms``."""
    out = {}
    flops = {"user_per_row": user_per_row, "group_per_row": group_per_row}
    for t in (1, 2):
        full_ms, stream_ms = med[f"full_t{t}"], med[f"stream_t{t}"]
        row = {"n": n, "full_ms": full_ms, "ceiling": ceiling}
        out[f"t{t}"] = {
            "full_ms": round(full_ms, 4), "stream_ms": round(stream_ms, 4),
            "stream_gb_per_s": round(user_bytes / stream_ms / 1e6, 2),
            "full_gflops": round(n * (user_per_row + group_per_row) / full_ms / 1e6, 2),
            "fraction": round(fraction_bound(row, flops, stream_ms), 4),
            "user_ms_for_0_8": round(full_ms / (0.8 * ceiling) - med[f"group_t{t}"], 4),
        }
    return out


def _contraction_flops(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """2·M·N·K of a ``MatMul`` or ``Gemm`` whose shapes inference resolved, else 0."""
    if node.op_type not in ("MatMul", "Gemm"):
        return 0
    a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not a or not out or 0 in a or 0 in out:
        return 0
    k = a[-1]
    if node.op_type == "Gemm":
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
    return 2 * int(np.prod(out)) * k


def boundary_free_flops(model: onnx.ModelProto, boundary: set[str], n: int) -> dict:
    """How much of a group graph could run before the user stage has finished: its nodes that
    depend on no ``boundary`` tensor, and their share of the graph's contraction FLOPs, at
    ``n`` candidate rows and one user (symbolic dimensions of boundary inputs set to 1, of
    every other input to ``n``; shapes by ONNX shape inference)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for i in model.graph.input:
        for d in i.type.tensor_type.shape.dim:
            if d.dim_param:
                d.ClearField("dim_param")
                d.dim_value = 1 if i.name in boundary else n
    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    waits = set(boundary)
    count = {"nodes": 0, "free_nodes": 0, "flops": 0, "free_flops": 0}
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        f = _contraction_flops(node, shapes)
        count["nodes"] += 1
        count["flops"] += f
        if any(x in waits for x in node.input):
            waits.update(node.output)
        else:
            count["free_nodes"] += 1
            count["free_flops"] += f
    count["free_flop_share"] = count["free_flops"] / count["flops"] if count["flops"] else 0.0
    return count


def bundle_bound(bundle: str, rounds: int, best_gemv_gb_per_s: float, n: int = 16) -> dict:
    """The bundle's stages at 1 and 2 threads, and the split's bound with ideal user GEMVs."""
    manifest = Manifest.read(bundle)
    user_bytes = weight_bytes(Path(bundle) / manifest.stages["user"].file)
    feeds = {s: stage_feeds(bundle, s, n) for s in ("full", "user", "group")}
    calls = {}
    for stage in ("full", "user", "group"):
        for t in (1, 2):
            s = session(bundle, stage, t)
            f = _only(s, feeds[stage])
            calls[f"{stage}_t{t}"] = lambda s=s, f=f: s.run(None, f)
    for t in (1, 2):  # one MatMul streaming the user graph's weight bytes: the floor at M=1
        calls[f"stream_t{t}"] = stream_call(user_bytes, t)
    med = {k: v * 1e3 for k, v in interleaved_medians(calls, rounds).items()}
    best = {st: min((1, 2), key=lambda t, st=st: med[f"{st}_t{t}"]) for st in ("full", "user", "group")}
    best_ms = {st: med[f"{st}_t{best[st]}"] for st in best}

    # where the user graph's time goes at M=1, on its better thread count
    prof_sess = session(bundle, "user", best["user"], enable_profiling=True,
                        profile_file_prefix=str(Path(os.environ.get("TMPDIR", "/tmp")) / "ugsep_gemv_m1"))
    prof = profile(prof_sess, _only(prof_sess, feeds["user"]), runs=50, top=0)
    kernel = {"gemm": 0.0, "other": 0.0, "other_nodes": 0}
    for op, v in prof["op_types"].items():
        if op in GEMM_OPS:
            kernel["gemm"] += v["ms"]
        else:
            kernel["other"] += v["ms"]
            kernel["other_nodes"] += v["nodes"]

    flops = manifest.flops
    ceiling = flop_ceiling(flops.user_per_row, flops.group_per_row, n)
    roofline = roofline_bounds(med, n, ceiling, flops.user_per_row, flops.group_per_row, user_bytes)
    ideal = best_gemv_bound(best_ms["full"], best_ms["group"], user_bytes, best_gemv_gb_per_s, ceiling)
    split_ms = best_ms["user"] + best_ms["group"]
    free = boundary_free_flops(onnx.load(str(Path(bundle) / manifest.stages["group"].file)),
                               {b.name for b in manifest.split.boundary}, n)
    return {
        "bundle": bundle, "n": n, "rounds": rounds, "stage_ms": {k: round(v, 4) for k, v in med.items()},
        "best_threads": best, "ceiling": round(ceiling, 4),
        "user_weight_bytes": user_bytes,
        "user_m1_kernel_ms": {k: round(v, 4) for k, v in kernel.items()},
        "user_m1_ms_if_streamed_at_best_gemv": round(ideal["user_ms"], 4),
        # the stage sessions alone (no scorer), each at its better thread count
        "fraction_of_ceiling_n16_stages": round(best_ms["full"] / split_ms / ceiling, 4),
        "fraction_of_ceiling_n16_best_gemv_bound": round(ideal["fraction"], 4),
        "group_n16_gflops": round(n * flops.group_per_row / best_ms["group"] / 1e6, 2),
        "group_ms_for_0_8_with_best_gemv_user": round(ideal["group_ms_for_0_8"], 4),
        # the memory roofline: user stage = streaming its weights, everything else at the full
        # graph's own FLOP rate, per thread count; the best of them
        "roofline": roofline,
        "fraction_of_ceiling_n16_roofline": max(r["fraction"] for r in roofline.values()),
        # what of the group graph could overlap the user stage on the other core
        "group_boundary_free": {**free, "free_flop_share": round(free["free_flop_share"], 4)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="a split bundle (bench_split's WORK/bundle): its N=16 bound")
    p.add_argument("--threads", type=int, default=1, help="threads of the microbenchmarks")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gemv_m1.json"))
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    gemv = gemv_rates(args.threads, args.rounds)
    print("GEMV [1,1024]x[1024,1024], GB/s: " + ", ".join(f"{k} {v}" for k, v in gemv["gb_per_s"].items()))
    layouts = {f"m{m}": per_token_layouts(args.threads, args.rounds, m) for m in (1, 16)}
    for k, r in layouts.items():
        print(f"per-token FFN {k}: unrolled {r['ms']['unrolled']:.3f} ms, batched "
              f"{r['ms']['batched']:.3f} ms ({r['batched_over_unrolled']:.2f}x)")
    rates = gemv["gb_per_s"]
    out = {
        "gemv": gemv,
        "ort_gemv_over_best": round(rates["onnxruntime_matmul"] / max(rates.values()), 3),
        "per_token": layouts,
        "cpu": cpu_summary(),
    }
    if args.bundle:
        out["n16"] = bound = bundle_bound(args.bundle, args.rounds, max(rates.values()))
        print(f"N=16 stages (ms): {bound['stage_ms']}")
        print(f"user M=1 kernels: GEMMs {bound['user_m1_kernel_ms']['gemm']:.3f} ms, the other "
              f"{bound['user_m1_kernel_ms']['other_nodes']} nodes {bound['user_m1_kernel_ms']['other']:.3f} ms")
        print(f"fraction of the N=16 ceiling: stages {bound['fraction_of_ceiling_n16_stages']:.2f}; "
              f"bound with every user weight at {max(rates.values()):.1f} GB/s and no other user "
              f"node: {bound['fraction_of_ceiling_n16_best_gemv_bound']:.2f}")
        print(f"group graph at N=16: {bound['group_n16_gflops']:.1f} GFLOP/s; 0.8 with that ideal user side "
              f"needs it in {bound['group_ms_for_0_8_with_best_gemv_user']:.2f} ms "
              f"(it takes {min(bound['stage_ms']['group_t1'], bound['stage_ms']['group_t2']):.2f})")
        roof = bound["roofline"]
        print("memory roofline at N=16 (user stage = streaming its weights, group at the full graph's "
              "rate): " + "; ".join(f"{t[1:]} thread{'s' if t != 't1' else ''}: stream {r['stream_ms']:.2f} ms "
                                    f"({r['stream_gb_per_s']:.1f} GB/s), full {r['full_ms']:.2f} ms, "
                                    f"fraction {r['fraction']:.2f}; 0.8 beside the measured group stage needs the user stage "
                                    f"in {r['user_ms_for_0_8']:.2f} ms" for t, r in roof.items()))
        free = bound["group_boundary_free"]
        print(f"group graph nodes that need no boundary tensor: {free['free_nodes']} of {free['nodes']}, "
              f"{free['free_flops'] / 1e6:.1f} of {free['flops'] / 1e6:.1f} MFLOP "
              f"({100 * free['free_flop_share']:.1f} %): what could overlap the user stage")
    out["load_average"] = {"before": load_before, "after": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
