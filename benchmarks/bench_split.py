"""Reproduce the UG-split figures: the `bench` RankMixer student, ONNX Runtime CPU, 2 threads.

    .venv/bin/python benchmarks/bench_split.py [--checkpoint DIR] [--threads 2]

Exports the student (random init unless --checkpoint; latency does not depend on the
weights) into a bundle with user.onnx / group.onnx / full.onnx, checks split parity vs
eager on one request, then runs exporter.commands.bench.run_bench: split vs full vs eager at
N in {1, 16, 128, 512, 2048}, interleaved, medians, FLOP ceiling beside each.
Writes benchmarks/results/bench_split.json and bench_split.png.

Then the group graph alone at N=2048 (one user's boundary rows) against the machine's sgemm
(torch.mm and numpy.dot of 2048x2048 float32, same threads), interleaved, medians:
``group_gflops_over_sgemm_n2048`` = the group graph's achieved GFLOP/s (its counted FLOPs,
2*M*N*K per contraction, over its wall time) / the better sgemm's GFLOP/s.
``fraction_of_ceiling_n16`` repeats the N=16 row's split speedup over its FLOP ceiling.

``--also w8a8`` (the default) exports the same student at each listed precision too and
measures its split at N=16 and its group graph against sgemm the same way; ``variants`` in
the JSON holds them beside the fp32 keys (the group's GFLOP/s count the same FLOPs per row,
so a w8a8 group's figure is its effective rate; the top-level keys stay fp32's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream_floor import fraction_bound, stream_floor, weight_bytes  # noqa: E402

import runtime  # noqa: E402
from exporter.commands.bench import DEFAULT_NS, print_table, run_bench  # noqa: E402
from exporter.load import LoadedModel, load_student  # noqa: E402
from exporter.pipeline import ExportOptions, export_bundle  # noqa: E402
from exporter.steps.capture import to_torch_inputs  # noqa: E402
from exporter.timing import cpu_summary  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.sample import sample_rows  # noqa: E402
from runtime.spec import FeatureSpec  # noqa: E402


def build(checkpoint: str | None) -> LoadedModel:
    if checkpoint:
        return load_student(checkpoint)
    from students.zoo import build_student

    torch.manual_seed(0)
    model = build_student("rankmixer", "bench").eval()
    return LoadedModel(spec=FeatureSpec.from_dict(model.feature_spec()), module=model)


def parity(bundle: Path, loaded: LoadedModel, n: int = 16) -> float:
    """Max abs error of the split bundle (ORT) vs eager on one request of n candidates."""
    spec = loaded.spec
    scorer = runtime.load(bundle, backend="onnxruntime", allow_unverified=True)
    u, c = sample_rows(spec, 1, 7), sample_rows(spec, n, 8)
    user = {s.name: u[s.name][0] for s in spec.user_inputs}
    cands = {s.name: c[s.name] for s in spec.group_inputs}
    got = scorer.score(user, cands)[spec.outputs[0]]
    full = {**{k: np.repeat(v[None], n, 0) for k, v in user.items()}, **cands}
    with torch.no_grad():
        ref = loaded.eager()(**to_torch_inputs(spec, full)).numpy()
    return float(np.abs(got - ref).max())


def bandwidth_bound(bundle: Path, threads: int, row16: dict, flops: dict) -> dict:
    """The user graph's weight-stream floor at M=1 and the bound it puts on the N=16 fraction:
    at the benchmark's thread count, and at the user stage's own (the export's ``threads``
    step stamps one on small-batch stages; the split runs it with that) when it differs."""
    u = None
    out: dict = {}
    stage_threads = json.loads((bundle / "manifest.json").read_text()).get("stages", {}).get(
        "user", {}).get("intra_op_threads")
    for key, th in (("", threads), ("_at_user_stage_threads", stage_threads)):
        if th is None or (key and th == threads):
            continue
        scorer = runtime.load(bundle, backend="onnxruntime", allow_unverified=True, intra_op_threads=th)
        u = u if u is not None else sample_rows(scorer.spec, 1, 7)
        feeds = {s.name: u[s.name] for s in scorer.spec.user_inputs}
        sf = stream_floor(lambda s=scorer, f=feeds: s.run_user(f), weight_bytes(bundle / "user.onnx"), th)
        bound = fraction_bound(row16, flops, sf["stream_ms"])
        print(f"user M=1 on {th} thread(s) {sf['user_m1_ms']:.2f} ms; streaming its "
              f"{sf['user_weight_bytes'] / 1e6:.1f} MB of weights {sf['stream_ms']:.2f} ms "
              f"({sf['stream_gb_per_s']:.1f} GB/s) -> N=16 fraction <= {bound:.2f}")
        out[f"stream_floor{key}"] = sf
        out[f"fraction_of_ceiling_n16_bandwidth_bound{key}"] = bound
    return out


def _sgemm_s(kind: str, a, b) -> float:
    t = time.perf_counter()
    if kind == "torch":
        torch.mm(a, b)
    else:
        np.dot(a, b)
    return time.perf_counter() - t


def group_vs_sgemm(bundle: Path, threads: int, group_flops_per_row: int, n: int = 2048,
                   size: int = 2048, repeats: int = 15) -> dict:
    """The group graph's GFLOP/s at N=``n`` over the measured sgemm GFLOP/s (same threads)."""
    torch.set_num_threads(threads)
    scorer = runtime.load(bundle, backend="onnxruntime", allow_unverified=True, intra_op_threads=threads)
    spec = scorer.spec
    u, c = sample_rows(spec, 1, 7), sample_rows(spec, n, 8)
    boundary = scorer.run_user({s.name: u[s.name] for s in spec.user_inputs})
    cands = {s.name: c[s.name] for s in spec.group_inputs}
    index = np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
    runs = {
        "group": lambda: _timed(lambda: scorer.run_group(cands, boundary, index)),
        "torch": lambda: _sgemm_s("torch", a_t, b_t),
        "numpy": lambda: _sgemm_s("numpy", a_np, b_np),
    }
    for f in runs.values():  # warm-up
        f()
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats):  # interleaved, order alternating
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            samples[k].append(runs[k]())
    med = {k: float(np.median(v)) for k, v in samples.items()}
    gemm_flops = 2.0 * size**3
    group_gflops = n * group_flops_per_row / med["group"] / 1e9
    sgemm = {k: gemm_flops / med[k] / 1e9 for k in ("torch", "numpy")}
    best = max(sgemm.values())
    print(f"group graph N={n}: {med['group'] * 1000:.1f} ms, {group_gflops:.1f} GFLOP/s; sgemm {size}^3: "
          f"torch {sgemm['torch']:.1f}, numpy {sgemm['numpy']:.1f} GFLOP/s -> {group_gflops / best:.2f}")
    return {
        "group_gflops_over_sgemm_n2048": group_gflops / best,
        "group_vs_sgemm": {"n": n, "threads": threads, "repeats": repeats, "group_ms": med["group"] * 1000,
                           "group_gflops": group_gflops, "sgemm_size": size, "sgemm_gflops": sgemm,
                           "sgemm_best_of_repeats_gflops": {k: gemm_flops / min(samples[k]) / 1e9
                                                            for k in ("torch", "numpy")}},
    }


def variant(loaded: LoadedModel, bundle: Path, precision: str, args, fp32_by_n: dict,
            flops: dict) -> dict:
    """The student at ``precision``: split vs its own full at N=16, and its group vs sgemm."""
    t0 = time.perf_counter()
    if not (args.reuse and (bundle / "manifest.json").exists()):
        export_bundle(loaded, bundle, ExportOptions(precision=precision, parity=False, overwrite=True))
    export_s = time.perf_counter() - t0
    print(f"{precision}: exported in {export_s:.1f}s; split max abs err vs eager {parity(bundle, loaded):.2e}")
    res = run_bench(bundle, (16,), args.threads, repeats=args.repeats, seconds_per_n=args.seconds_per_n,
                    eager=None)
    row = res["results"][0]
    out = {"bundle": str(bundle), "export_s": export_s, "n16": row,
           "fraction_of_ceiling_n16": row["fraction_of_ceiling"]}
    out.update(bandwidth_bound(bundle, args.threads, row, flops))
    if 16 in fp32_by_n:  # its split against the fp32 full graph (separate runs, medians each)
        out["fraction_of_ceiling_n16_vs_fp32_full"] = (
            fp32_by_n[16]["full_ms"] / row["split_ms"] / row["ceiling"])
    sg = group_vs_sgemm(bundle, args.threads, flops["group_per_row"])
    out["group_gflops_over_sgemm_n2048"] = sg["group_gflops_over_sgemm_n2048"]
    out["group_vs_sgemm"] = sg["group_vs_sgemm"]
    q = json.loads((bundle / "manifest.json").read_text()).get("quantization") or {}
    out["stages"] = {k: v.get("scheme") for k, v in (q.get("scheme", {}).get("stages") or {}).items()}
    return out


def shared_pool(bundle: Path, args, ns: tuple[int, ...] = (16, 512)) -> dict:
    """Full vs split with ONNX Runtime's process-wide pool (``ugsep bench --thread-pool
    process``, in a process of its own: the pool is process-wide state), interleaved, medians."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "exporter.cli", "bench", str(bundle), "--n", *map(str, ns),
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--seconds-per-n",
               str(args.seconds_per_n), "--no-eager", "--thread-pool", "process",
               "--json", f"{tmp}/b.json", "--png", f"{tmp}/b.png"]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        res = json.loads(Path(f"{tmp}/b.json").read_text())
    rows = {r["n"]: {k: r[k] for k in ("full_ms", "split_ms", "speedup", "ceiling", "fraction_of_ceiling")}
            for r in res["results"]}
    print("shared pool: " + ", ".join(f"N={n} full {r['full_ms']:.2f} ms split {r['split_ms']:.2f} ms "
                                      f"({r['fraction_of_ceiling']:.2f} of the ceiling)" for n, r in rows.items()))
    return {"threads": args.threads, "rows": rows, "load_average": res["load_average"]}


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a trained bench RankMixer checkpoint directory")
    p.add_argument("--work", default="/tmp/ugsep_bench_split", help="where the bundle goes")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_NS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seconds-per-n", type=float, default=30.0)
    p.add_argument("--also", default="w8a8", help="more precisions measured beside fp32 ('' for none)")
    p.add_argument("--reuse", action="store_true",
                   help="keep an existing WORK/bundle-PRECISION (its split error vs this eager model is printed)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = build(args.checkpoint)
    bundle = Path(args.work) / "bundle"
    t0 = time.perf_counter()
    export_bundle(loaded, bundle, ExportOptions(parity=False, overwrite=True))
    print(
        f"exported in {time.perf_counter() - t0:.1f}s; split parity max abs err "
        f"{parity(bundle, loaded):.2e}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_bench(
        bundle,
        tuple(args.n),
        args.threads,
        repeats=args.repeats,
        seconds_per_n=args.seconds_per_n,
        eager=loaded.eager(),
        out_json=out / "bench_split.json",
        out_png=out / "bench_split.png",
    )
    result["boundary"] = [b.to_dict() for b in Manifest.read(bundle).split.boundary]
    by_n = {r["n"]: r for r in result["results"]}
    if 16 in by_n:
        result["fraction_of_ceiling_n16"] = by_n[16]["fraction_of_ceiling"]
        result.update(bandwidth_bound(bundle, args.threads, by_n[16], result["flops"]))
    result.update(group_vs_sgemm(bundle, args.threads, result["flops"]["group_per_row"]))
    result["shared_thread_pool"] = shared_pool(bundle, args)
    if 16 in result["shared_thread_pool"]["rows"]:
        result["fraction_of_ceiling_n16_shared_thread_pool"] = (
            result["shared_thread_pool"]["rows"][16]["fraction_of_ceiling"])
    result["variants"] = {}
    for precision in filter(None, args.also.split(",")):
        result["variants"][precision] = variant(loaded, Path(args.work) / f"bundle-{precision}", precision,
                                                args, by_n, result["flops"])
    result["load_average"]["end"] = os.getloadavg()
    result["cpu"] = cpu_summary()  # w8a8's figures depend on its int8 dot product (VNNI or not)
    (out / "bench_split.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
