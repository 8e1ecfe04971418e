"""Triton load benchmark: the same split bundle served three ways, same workload.

    ugsep-serve   `ugsep serve` (runtime.serving: split + user cache + batcher)
    triton-cpu    `ugsep triton --kind cpu`: Python-backend model running the ugsep runtime
    triton-bls    `ugsep triton --kind gpu --stage-backend python`: BLS orchestrator + user
                  and group stage models (the GPU topology, stages on ORT CPU here)

All on loopback, same compute budget (``--threads`` ORT threads per graph, one model
instance). Workload and method as bench_serve: Zipf-drawn users, N candidates per
request, closed-loop clients, variants interleaved per round, medians over rounds.
Triton gets the same requests in its wire format (candidates [1, N, ...]).

    python benchmarks/bench_triton.py --quick
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serve import (  # noqa: E402
    _binary_body,
    _free_port,
    parse_args,
    prepare,
    run_segment,
    start,
    stop,
    summarise,
)

from runtime.sample import sample_input  # noqa: E402
from runtime.spec import FeatureSpec  # noqa: E402
from runtime.triton import write_repository  # noqa: E402
from runtime.triton.env import ensure_triton_env  # noqa: E402
from runtime.triton.server import TritonServer  # noqa: E402

VARIANTS = ("ugsep-serve", "triton-cpu", "triton-bls")


def make_bodies(spec: FeatureSpec, n_bodies: int, n: int, users: int, zipf: float, seed: int):
    """Per request: the KServe body for `ugsep serve` and the same tensors in Triton's format."""
    rng = np.random.default_rng(seed)
    pool = {s.name: sample_input(s, users, rng) for s in spec.user_inputs}
    p = 1.0 / np.arange(1, users + 1) ** zipf
    who = rng.choice(users, size=n_bodies, p=p / p.sum())
    serve, triton = [], []
    for u in who:
        user = {k: v[u : u + 1] for k, v in pool.items()}
        cands = {s.name: sample_input(s, n, rng) for s in spec.group_inputs}
        serve.append(_binary_body({**user, **cands}, list(spec.outputs)))
        triton.append(_binary_body({**user, **{k: v[None] for k, v in cands.items()}}, list(spec.outputs)))
    return {"ugsep-serve": serve, "triton-cpu": triton, "triton-bls": triton}, who


def start_servers(args, work: Path, bundle: Path, name: str):
    """Start the three servers; returns ({variant: infer url}, stop callbacks)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "runtime.serving", str(bundle), "--port", str(port), "--threads",
           str(args.threads), "--max-delay-ms", str(args.max_delay_ms), "--log-level", "warning"]
    serve = start(cmd, port, work / "ugsep-serve.log")
    urls = {"ugsep-serve": f"http://127.0.0.1:{port}/v2/models/{name}/infer"}
    stops = [lambda: stop(serve)]
    env = ensure_triton_env()
    delay_us = int(args.max_delay_ms * 1000)
    for variant, kind, extra in (("triton-cpu", "cpu", {}), ("triton-bls", "gpu", {"stage_backend": "python"})):
        repo = write_repository(bundle, work / f"repo-{variant}", kind, overwrite=True, intra_op_threads=args.threads,
                                max_queue_delay_us=delay_us, **extra)
        server = TritonServer(repo.root, env, log_path=work / f"{variant}.log").start()
        urls[variant] = f"http://{server.http_url}/v2/models/{repo.model_name}/infer"
        stops.append(server.stop)
    return urls, stops


def measure(args, urls: dict, bodies: dict) -> list[dict]:
    for name in VARIANTS:  # warm-up (not measured)
        asyncio.run(run_segment(urls[name], bodies[name], 0, 2, 2.0, 6))
    segments, cursor = [], 0
    for rnd in range(args.rounds):
        for conc in [int(c) for c in args.concurrency.split(",")]:
            shift = (rnd + conc) % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:  # rotate the order: no variant always first
                lat, fails, wall = asyncio.run(
                    run_segment(urls[name], bodies[name], cursor, conc, args.duration, args.max_requests))
                cursor += len(lat) + fails
                lat_ms = np.array(lat) * 1000 if lat else np.array([np.nan])
                seg = {"variant": name, "concurrency": conc, "round": rnd, "requests": len(lat), "failures": fails,
                       "wall_s": wall, "candidates_per_s": len(lat) * args.candidates / wall,
                       "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99))}
                segments.append(seg)
                print(f"round {rnd} conc {conc:3d} {name:11s} {seg['candidates_per_s']:8.0f} cand/s "
                      f"p50 {seg['p50_ms']:7.1f} ms p99 {seg['p99_ms']:7.1f} ms ({len(lat)} req, {fails} failed)",
                      flush=True)
    return segments


def print_table(rows: list[dict], baseline: str = "ugsep-serve") -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Triton vs ugsep serve: candidates/s and latency (medians over rounds)")
    for c in ("variant", "conc", "cand/s", "p50 ms", "p99 ms", "req", "fail", f"cand/s vs {baseline}"):
        t.add_column(c, justify="right", no_wrap=True)
    base = {r["concurrency"]: r for r in rows if r["variant"] == baseline}
    for r in rows:
        b = base.get(r["concurrency"])
        ratio = f"{r['candidates_per_s'] / b['candidates_per_s']:.2f}x" if b else "-"
        t.add_row(r["variant"], str(r["concurrency"]), f"{r['candidates_per_s']:.0f}", f"{r['p50_ms']:.1f}",
                  f"{r['p99_ms']:.1f}", str(r["requests"]), str(r["failures"]), ratio)
    Console(width=120).print(t)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work if args.work != "artifacts/bench_serve" else "artifacts/bench_triton")
    work.mkdir(parents=True, exist_ok=True)
    ckpt, bundle, manifest = prepare(work, args.size, args.checkpoint)
    spec = FeatureSpec.from_dict(manifest["spec"])
    bodies, who = make_bodies(spec, 1000, args.candidates, args.users, args.zipf, seed=1)
    urls, stops = start_servers(args, work, bundle, manifest["model_name"])
    try:
        segments = measure(args, urls, bodies)
    finally:
        for s in stops:
            s()
    rows = summarise(segments)
    print_table(rows)
    result = {
        "benchmark": "bench_triton", "student": f"rankmixer-{args.size}", "bundle": str(bundle),
        "candidates": args.candidates, "users": args.users, "zipf": args.zipf,
        "distinct_users_in_workload": int(len(set(who.tolist()))), "threads": args.threads,
        "max_delay_ms": args.max_delay_ms, "duration_s": args.duration, "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version()},
        "summary": rows, "segments": segments,
    }
    out = Path(args.out) if args.out else work / "bench_triton.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
