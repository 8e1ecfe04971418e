"""Embedding lookups from the local memory-mapped store vs a Redis Cluster tier + hot-row cache.

Starts its own three-master Redis Cluster (Debian's redis-server) on loopback ports, then:

1. **lookups**: one fp32 table (``--rows`` x ``--dim``), batches of ``N x fields`` ids drawn
   from a Zipf distribution (exponent ``--zipf``, the serving benchmark's user
   distribution, over a random permutation of the rows); ``np.take`` on the memory map
   (what the local store does) vs ``RedisTier.lookup`` with no cache and a hot cache of
   1 % and 10 % of the table's bytes (warmed up first). Variants interleaved per round;
   medians over rounds of ids/s and the p99 of one batch's lookup.
2. **served**: the ``bench`` RankMixer student exported with its tables in the store,
   served by ``ugsep serve`` twice — local store vs ``--embeddings redis://…`` with a 1 %
   hot cache — under the same closed-loop load (Zipf users and Zipf candidate ids, N
   candidates per request), interleaved rounds; candidates/s and p99.

    python benchmarks/bench_embedding_tier.py            # writes benchmarks/results/bench_embedding_tier.json
    python benchmarks/bench_embedding_tier.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_serve's load generator and server helpers

from runtime.redis_tier import ArrayTable, RedisTier, push  # noqa: E402
from tests.redis_tier.redis_cluster import LocalRedisCluster  # noqa: E402

MB = 1 << 20


class ZipfIds:
    """Ids with P(rank k) ~ 1/k^a; rank -> row through a fixed random permutation."""

    def __init__(self, rows: int, a: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        p = 1.0 / np.arange(1, rows + 1) ** a
        self.cdf = np.cumsum(p / p.sum())
        self.perm = rng.permutation(rows)
        self.rng = rng

    def draw(self, shape) -> np.ndarray:
        ranks = np.minimum(np.searchsorted(self.cdf, self.rng.random(shape)), len(self.perm) - 1)
        return self.perm[ranks].astype(np.int64)


def bench_lookups(url: str, work: Path, args) -> dict:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    np.save(work / "table.npy", table)
    local = np.load(work / "table.npy", mmap_mode="r")
    version = f"bench-{args.rows}x{args.dim}"
    t0 = time.perf_counter()
    rep = push(url, [ArrayTable.from_float("item", table)], version, progress=True)
    push_s = time.perf_counter() - t0
    del table
    nbytes = args.rows * args.dim * 4
    tiers = {f"redis_cache_{k}": RedisTier.open(url, version, cache_bytes=int(f * nbytes))
             for k, f in (("none", 0), ("1pct", 0.01), ("10pct", 0.10))}  # none = 0 %: no cache
    zipf = ZipfIds(args.rows, args.zipf, seed=1)
    shape = (args.candidates, args.fields)
    buf = np.empty((args.candidates * args.fields, args.dim), np.float32)

    def local_lookup(ids):
        return np.take(local, ids.reshape(-1), axis=0, out=buf)

    variants = {"local_mmap": local_lookup, **{k: (lambda ids, t=t: t.lookup("item", ids)) for k, t in tiers.items()}}
    for _ in range(args.warmup_batches):  # fill the hot caches (steady state)
        ids = zipf.draw(shape)
        for fn in variants.values():
            fn(ids)
    before = {k: t.cache.stats() for k, t in tiers.items()}
    per_round = {k: [] for k in variants}
    for r in range(args.rounds):
        batches = [zipf.draw(shape) for _ in range(args.batches)]
        names = list(variants)
        for k in names[r % len(names):] + names[: r % len(names)]:  # rotate the order per round
            lat = []
            for ids in batches:
                t = time.perf_counter()
                variants[k](ids)
                lat.append(time.perf_counter() - t)
            lat = np.array(lat)
            per_round[k].append({"ids_per_s": ids.size * len(lat) / lat.sum(), "p50_ms": 1e3 * np.median(lat),
                                 "p99_ms": 1e3 * np.percentile(lat, 99)})
    rows = {}
    for k, segs in per_round.items():
        rows[k] = {m: float(np.median([s[m] for s in segs])) for m in ("ids_per_s", "p50_ms", "p99_ms")}
        if k in tiers:
            st, b = tiers[k].cache.stats(), before[k]
            hits, misses = st.hits - b.hits, st.misses - b.misses
            rows[k].update(hit_rate=hits / max(1, hits + misses), cache_bytes=st.max_bytes)
    for k in rows:
        rows[k]["over_local"] = rows[k]["ids_per_s"] / rows["local_mmap"]["ids_per_s"]
    return {"rows": args.rows, "dim": args.dim, "batch_ids": list(shape), "zipf": args.zipf,
            "push_seconds": push_s, "push_rows_per_s": rep.rows / push_s, "variants": rows}


def print_lookups(res: dict) -> None:
    print(f"\nlookups: {res['rows']} x {res['dim']} fp32, batches {res['batch_ids']}, zipf {res['zipf']}; "
          f"push {res['push_seconds']:.1f} s ({res['push_rows_per_s']:.0f} rows/s)")
    print(f"{'variant':22} {'ids/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'hit rate':>9} {'x local':>8}")
    for k, v in res["variants"].items():
        hr = f"{v['hit_rate']:.3f}" if "hit_rate" in v else "-"
        print(f"{k:22} {v['ids_per_s']:12.0f} {v['p50_ms']:8.3f} {v['p99_ms']:8.3f} {hr:>9} {v['over_local']:8.3f}")


def export_student(work: Path, size: str) -> Path:
    """The random-init RankMixer student of ``size`` with its tables in the store (cached in work)."""
    bundle = work / f"rankmixer-{size}-store-bundle"
    if (bundle / "manifest.json").exists():
        return bundle
    import torch

    from exporter import ExportOptions, export_bundle, load_student
    from exporter.steps.embeddings import EmbeddingsOptions
    from students.checkpoint import save_checkpoint
    from students.zoo import FACTORY, build_model, model_kwargs

    torch.manual_seed(0)
    kwargs = model_kwargs("rankmixer", size)
    model = build_model(**kwargs).eval()
    ckpt = work / f"rankmixer-{size}-ckpt"
    save_checkpoint(model, FACTORY, kwargs, model.feature_spec(), ckpt, {"note": "random init (speed only)"})
    # parity is tests' business (tests/redis_tier: tier scores == local store); speed only here
    opts = ExportOptions(max_candidates=1024, parity=False, overwrite=True,
                         embeddings=EmbeddingsOptions(dtype="fp32", min_bytes=1 << 16))
    export_bundle(load_student(ckpt), bundle, opts)
    return bundle


def make_bodies(spec, n_bodies: int, n: int, users: int, zipf: float, seed: int):
    """Binary KServe requests: Zipf-drawn users (as bench_serve) and Zipf-drawn candidate ids."""
    from bench_serve import _binary_body

    from runtime.sample import sample_input

    rng = np.random.default_rng(seed)
    pool = {s.name: sample_input(s, users, rng) for s in spec.user_inputs}
    p = 1.0 / np.arange(1, users + 1) ** zipf
    who = rng.choice(users, size=n_bodies, p=p / p.sum())
    ids = {s.name: ZipfIds(s.vocab, zipf, seed + i) for i, s in enumerate(spec.group_inputs) if s.vocab}
    bodies = []
    for u in who:
        tensors = {k: v[u : u + 1] for k, v in pool.items()}
        for s in spec.group_inputs:
            x = ids[s.name].draw((n, *s.shape)) if s.name in ids else sample_input(s, n, rng)
            tensors[s.name] = x.astype(s.dtype) if s.name in ids else x
        bodies.append(_binary_body(tensors, list(spec.outputs)))
    return bodies


def bench_served(url: str, work: Path, args) -> dict:
    """candidates/s and p99 of ugsep serve: local store vs Redis tier with a 1 % hot cache."""
    from bench_serve import _free_port, run_segment, start, stop

    from runtime.bundle import Bundle
    from runtime.redis_tier.store import bundle_tables, store_version

    bundle_path = export_student(work, args.size)
    bundle = Bundle.open(bundle_path)
    tables = bundle_tables(bundle)
    push(url, tables, store_version(bundle), progress=True)
    store_bytes = sum(t.layout.nbytes for t in tables)
    cache_mb = 0.01 * store_bytes / MB
    base = [sys.executable, "-m", "runtime.serving", str(bundle_path), "--threads", str(args.threads),
            "--allow-unverified", "--log-level", "warning"]
    variants = {"local_store": [], "redis_cache_1pct": ["--embeddings", url, "--embeddings-cache-mb", f"{cache_mb:.4f}"]}
    bodies = make_bodies(bundle.manifest.spec, 1000, args.candidates, 2000, args.zipf, seed=1)
    procs, urls = {}, {}
    try:
        for k, extra in variants.items():
            port = _free_port()
            procs[k] = start([*base, "--port", str(port), *extra], port, work / f"serve-{k}.log")
            urls[k] = f"http://127.0.0.1:{port}/v2/models/{bundle.manifest.model_name}/infer"
            asyncio.run(run_segment(urls[k], bodies, 0, args.concurrency, args.duration / 2, 10**9))  # warm up
        segments, start_at = [], 0
        for r in range(args.rounds):
            for k in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                lat, fails, secs = asyncio.run(run_segment(urls[k], bodies, start_at, args.concurrency,
                                                           args.duration, 10**9))
                start_at += len(lat) + fails
                segments.append({"variant": k, "round": r, "requests": len(lat), "failures": fails,
                                 "candidates_per_s": len(lat) * args.candidates / secs,
                                 "p50_ms": 1e3 * float(np.median(lat)), "p99_ms": 1e3 * float(np.percentile(lat, 99))})
    finally:
        for proc in procs.values():
            stop(proc)
    rows = {k: {m: float(np.median([s[m] for s in segments if s["variant"] == k]))
                for m in ("candidates_per_s", "p50_ms", "p99_ms")} for k in variants}
    paired = [s2["candidates_per_s"] / s1["candidates_per_s"] for s1, s2 in
              zip([s for s in segments if s["variant"] == "local_store"],
                  [s for s in segments if s["variant"] == "redis_cache_1pct"], strict=True)]
    return {"student": f"rankmixer-{args.size}", "candidates": args.candidates, "concurrency": args.concurrency,
            "store_bytes": store_bytes, "hot_cache_mb": cache_mb, "tables": [t.layout.name for t in tables],
            "variants": rows, "segments": segments,
            "ratio_cps": {"redis_cache_1pct": float(np.median(paired))},
            "failures": sum(s["failures"] for s in segments)}


def print_served(res: dict) -> None:
    print(f"\nserved: {res['student']}, N={res['candidates']}, concurrency {res['concurrency']}, "
          f"store {res['store_bytes'] / MB:.1f} MiB, hot cache {res['hot_cache_mb']:.2f} MiB")
    for k, v in res["variants"].items():
        print(f"{k:20} {v['candidates_per_s']:10.0f} cand/s  p50 {v['p50_ms']:7.1f} ms  p99 {v['p99_ms']:7.1f} ms")
    print(f"redis / local candidates/s (median of paired rounds): {res['ratio_cps']['redis_cache_1pct']:.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--candidates", type=int, default=200, help="N candidates per request")
    p.add_argument("--fields", type=int, default=6, help="id fields per candidate (the bench student's 6)")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--batches", type=int, default=100, help="batches per variant per round")
    p.add_argument("--warmup-batches", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-served", action="store_true", help="lookups only")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--duration", type=float, default=15.0, help="seconds per served segment")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per graph in the servers")
    p.add_argument("--size", default="bench", help="student size for the served part (bench, tiny)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_embedding_tier.json"))
    p.add_argument("--work", default=None, help="keep the exported bundle here between runs")
    args = p.parse_args()
    if args.quick:
        args.rows, args.batches, args.warmup_batches, args.rounds, args.duration = 100_000, 30, 50, 2, 4.0
        args.size = "tiny"
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-tier-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "bench_embedding_tier", "host": platform.node(), "cpus": os.cpu_count(),
              "loadavg_start": os.getloadavg(), "args": vars(args)}
    cluster = LocalRedisCluster(work / "redis", masters=3, durable=False).start()
    try:
        result["lookups"] = bench_lookups(cluster.url, work, args)
        print_lookups(result["lookups"])
        if not args.no_served:
            result["served"] = bench_served(cluster.url, work, args)
            print_served(result["served"])
    finally:
        cluster.stop()
    result["loadavg_end"] = os.getloadavg()
    served = result.get("served", {}).get("ratio_cps", {})
    result["redis_over_local_cps_cache_1pct"] = served.get("redis_cache_1pct")
    result["lookup_redis_over_local_ids_per_s"] = {k: v["over_local"] for k, v in result["lookups"]["variants"].items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwrote {args.out}; redis_over_local_cps_cache_1pct = {result['redis_over_local_cps_cache_1pct']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
