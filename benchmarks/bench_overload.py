"""Overload benchmark: does ``ugsep serve`` keep its admitted requests' latency under 2x and 4x
its capacity, and stay answerable under idle connections and slow senders?

    python benchmarks/bench_overload.py               # RankMixer 'bench' student, N=200
    python benchmarks/bench_overload.py --quick       # tiny student, short segments

Servers are subprocesses on 127.0.0.1 (``python -m runtime.serving``, one compute thread).
Steps, every load bounded in count and time:

1. unloaded: sequential requests -> unloaded p99;
2. capacity: closed-loop clients against a server that sheds nothing -> completed/s;
3. overload: open-loop Poisson arrivals at 2x and 4x capacity against the default server
   (admission by deadline) and against one that admits everything (``--latency-budget-ms``
   huge, the queue of 512 as before): accepted p99 / unloaded p99 (``p99_ratio``), share
   shed, RSS growth. Variants interleaved over ``--rounds``; the table quotes medians;
4. 1,100 idle connections (past the default ``--limit-concurrency`` 1024) while health is
   probed every 50 ms; how many the header timeout closed;
5. 60 slow senders each declaring a 7.9 MB body and trickling it; health latency, RSS,
   the statuses they got.

Writes ``benchmarks/results/bench_overload.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import bench_serve  # noqa: E402
from overload_client import (  # noqa: E402
    RssSampler,
    closed_loop,
    count_closed,
    idle_connections,
    open_loop,
    slow_sender,
)

from runtime.spec import FeatureSpec  # noqa: E402
from tests.serving.probe import ProcessHealthProbe  # noqa: E402

NO_SHEDDING = ["--latency-budget-ms", "600000"]


def server(bundle: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "runtime.serving", str(bundle), "--port", str(port), "--threads", "1",
           "--log-level", "warning", *extra]
    return bench_serve.start(cmd, port, log)


def p99_ms(lat: list[float]) -> float:
    return float(np.percentile(np.array(lat) * 1000, 99)) if lat else float("nan")


def unloaded(url: str, bodies, n: int) -> dict:
    res, _ = asyncio.run(closed_loop(url, bodies, 1, 60, n))
    lat = [t for s, t in res if s == 200]
    return {"requests": len(res), "ok": len(lat), "p50_ms": round(float(np.median(lat)) * 1000, 2),
            "p99_ms": round(p99_ms(lat), 2)}


def capacity(url: str, bodies, concurrency: int, duration: float) -> dict:
    res, wall = asyncio.run(closed_loop(url, bodies, concurrency, duration, 100_000))
    ok = sum(1 for s, _ in res if s == 200)
    return {"concurrency": concurrency, "ok": ok, "seconds": round(wall, 2), "rps": round(ok / wall, 2)}


def overload(url: str, bodies, pid: int, rate: float, duration: float, seed: int) -> dict:
    with RssSampler(pid) as rss:
        t0 = time.perf_counter()
        res = asyncio.run(open_loop(url, bodies, rate, duration, seed))
        wall = time.perf_counter() - t0
    ok = [t for s, t, _ in res if s == 200]
    shed = [(s, t, ra) for s, t, ra in res if s in (429, 503)]
    return {
        "rate_rps": round(rate, 2), "sent": len(res), "ok": len(ok), "shed": len(shed),
        "other": len(res) - len(ok) - len(shed), "max_status": max(s for s, _, _ in res),
        "share_shed": round(len(shed) / len(res), 3), "accepted_rps": round(len(ok) / wall, 2),
        "accepted_p50_ms": round(float(np.median(ok)) * 1000, 2) if ok else None,
        "accepted_p99_ms": round(p99_ms(ok), 2),
        "shed_p99_ms": round(p99_ms([t for _, t, _ in shed]), 2) if shed else None,
        "shed_with_retry_after": sum(1 for *_, ra in shed if ra is not None),
        **rss.summary(),
    }


def idle_phase(port: int, pid: int, n: int, hold: float, header_timeout: float) -> dict:
    with RssSampler(pid) as rss, ProcessHealthProbe(port) as probe:
        socks = idle_connections(port, n)
        time.sleep(hold)
        closed_before = count_closed(socks)
        time.sleep(max(0.0, header_timeout + 2 - hold))
        closed_after = count_closed(socks)
        for s in socks:
            s.close()
    return {"connections": n, "held_s": hold, "closed_by_server_within_hold": closed_before,
            "closed_by_server_after_header_timeout": closed_after, **probe.summary(), **rss.summary()}


def slow_phase(port: int, pid: int, model: str, n: int, size: int, seconds: float) -> dict:
    path = f"/v2/models/{model}/infer"
    statuses: list[int] = []
    deadline = time.monotonic() + seconds
    with RssSampler(pid) as rss, ProcessHealthProbe(port) as probe:
        threads = [threading.Thread(target=lambda: statuses.append(
            slow_sender(port, path, size, 64 << 10, 0.25, deadline))) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 30)
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    return {"senders": n, "declared_bytes": size, "statuses": counts, **probe.summary(), **rss.summary()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="bench", choices=["tiny", "bench"])
    p.add_argument("--work", default="artifacts/bench_overload")
    p.add_argument("--out", default=str(HERE / "results" / "bench_overload.json"))
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per overload segment")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--levels", default="2,4", help="multiples of the measured capacity")
    p.add_argument("--idle", type=int, default=1100)
    p.add_argument("--slow", type=int, default=60)
    p.add_argument("--quick", action="store_true", help="tiny student, one short round")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.duration = "tiny", 1, 4.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    _, bundle, manifest = bench_serve.prepare(work, args.size, None)
    spec = FeatureSpec.from_dict(manifest["spec"])
    raw, _ = bench_serve.make_bodies(spec, 256, args.candidates, 2000, 1.1, seed=0)
    bodies = [(b, {bench_serve.HEADER_LENGTH: h, "Content-Type": "application/octet-stream"}) for b, h in raw]
    name = manifest["model_name"]
    ports = {v: bench_serve._free_port() for v in ("admission", "admit_all")}
    urls = {v: f"http://127.0.0.1:{p}/v2/models/{name}/infer" for v, p in ports.items()}
    procs = {"admission": server(bundle, ports["admission"], work / "admission.log")}
    try:
        procs["admit_all"] = server(bundle, ports["admit_all"], work / "admit_all.log", *NO_SHEDDING)
    except BaseException:
        bench_serve.stop(procs["admission"])
        raise
    out: dict = {"loadavg_start": os.getloadavg(), "bundle": str(bundle), "candidates": args.candidates,
                 "host": platform.node(), "python": platform.python_version()}
    try:
        for v in procs:  # warm both
            asyncio.run(closed_loop(urls[v], bodies, 2, 3, 50))
        out["unloaded"] = unloaded(urls["admission"], bodies, 200)
        out["capacity"] = capacity(urls["admit_all"], bodies, 4, args.duration)
        cap, base = out["capacity"]["rps"], out["unloaded"]["p99_ms"]
        segments = []
        for r in range(args.rounds):
            for level in [float(x) for x in args.levels.split(",")]:
                for v in ("admission", "admit_all"):
                    seg = overload(urls[v], bodies, procs[v].pid, level * cap, args.duration, seed=r * 10 + int(level))
                    seg.update(variant=v, level=level, round=r, p99_ratio=round(seg["accepted_p99_ms"] / base, 2))
                    segments.append(seg)
                    print(json.dumps(seg), flush=True)
                    time.sleep(2)
        out["segments"] = segments
        out["levels"] = summarise(segments)
        header_timeout = 10.0
        out["idle_connections"] = idle_phase(ports["admission"], procs["admission"].pid, args.idle, 5.0, header_timeout)
        print(json.dumps(out["idle_connections"]), flush=True)
        out["slow_senders"] = slow_phase(ports["admission"], procs["admission"].pid, name, args.slow, 7_900_000, 25.0)
        print(json.dumps(out["slow_senders"]), flush=True)
    finally:
        for p in procs.values():
            bench_serve.stop(p)
    out["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print_table(out)
    return 0


def summarise(segments: list[dict]) -> list[dict]:
    """Medians over rounds per (variant, level)."""
    rows = []
    for key in sorted({(s["variant"], s["level"]) for s in segments}):
        seg = [s for s in segments if (s["variant"], s["level"]) == key]
        med = {k: float(np.median([s[k] for s in seg])) for k in
               ("rate_rps", "share_shed", "accepted_rps", "accepted_p99_ms", "p99_ratio", "rss_growth_mb")}
        rows.append({"variant": key[0], "level": key[1], "rounds": len(seg),
                     "max_status": max(s["max_status"] for s in seg), **med})
    return rows


def print_table(out: dict) -> None:
    print(f"\nunloaded p99 {out['unloaded']['p99_ms']} ms, capacity {out['capacity']['rps']} req/s")
    print(f"{'variant':<10} {'load':>5} {'shed':>6} {'ok/s':>7} {'p99 ms':>8} {'p99_ratio':>9} {'RSS +MB':>8}")
    for r in out["levels"]:
        print(f"{r['variant']:<10} {r['level']:>4}x {r['share_shed']:>6.2f} {r['accepted_rps']:>7.1f} "
              f"{r['accepted_p99_ms']:>8.1f} {r['p99_ratio']:>9.2f} {r['rss_growth_mb']:>8.1f}")


if __name__ == "__main__":
    sys.exit(main())
