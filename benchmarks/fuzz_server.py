"""Fuzz ``ugsep serve`` with 10,000+ hostile HTTP requests over every class in
tests/serving/fuzz_requests.py, then 5,000+ hostile gRPC calls over every class in
tests/serving/fuzz_grpc.py; count statuses and probe health throughout.

    python benchmarks/fuzz_server.py                  # 10,000 HTTP requests + 5,000 gRPC calls (~10 min)
    python benchmarks/fuzz_server.py --examples 500 --grpc-examples 500   # a quick look

The server is a subprocess on 127.0.0.1 (``python -m runtime.serving --grpc-port``, default
limits except 3 s header/body timeouts) serving the serving tests' toy split bundle;
Hypothesis draws the requests (a class, then a request of it); a process probes
``/v2/health/live`` every 50 ms on a fresh connection (and for 5 s before, idle: the
machine's own noise), and during the gRPC phase a second one calls ``grpc.health.v1.Health/
Check`` every 50 ms. Writes ``benchmarks/results/fuzz_server.json``: the HTTP phase's count,
per-class statuses, ``max_status``, ``responses_5xx``, health latency (max, p99), RSS at the
top level (as before), and the gRPC phase under ``grpc``: per-class status codes,
``internal_or_unknown`` (the gRPC analogue of a 5xx), ``unexpected`` (codes outside the
class's documented set), both health probes, RSS, load average.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import bench_serve  # noqa: E402
import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from overload_client import RssSampler  # noqa: E402

from tests.serving import fuzz_grpc  # noqa: E402
from tests.serving.fuzz_requests import send, strategies  # noqa: E402
from tests.serving.probe import ProcessHealthProbe  # noqa: E402

MAX_BODY_BYTES = 8 << 20  # the server's default --max-body-mb: gRPC's max receive message size


def toy_bundle(work: Path) -> Path:
    from tests.serving.split_bundle import make_parts, write_split_bundle

    path = work / "toysplit"
    if not (path / "manifest.json").exists():
        write_split_bundle(path, *make_parts(seed=0), max_candidates=256)
    return path


def fuzz(port: int, model: str, examples: int, seed: int) -> tuple[dict, int]:
    path = f"/v2/models/{model}/infer"
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    sent = 0
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        classes = strategies(client.get(f"/v2/models/{model}").json())

        @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(sorted(classes)).flatmap(lambda c: classes[c]))
        def run(case):
            nonlocal sent
            try:
                status = send(client, port, path, case)
            except httpx.TransportError:
                status = -1  # the server dropped the connection without answering
            statuses[case.cls][status] += 1
            sent += 1
            if sent % 1000 == 0:
                print(f"{sent} requests", flush=True)

        run()
    return {c: dict(sorted(v.items())) for c, v in sorted(statuses.items())}, sent


def fuzz_grpc_calls(gport: int, meta: dict, examples: int) -> tuple[dict, dict, int]:
    """(per-class codes, per-class codes outside the class's documented set, calls sent)."""
    codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unexpected: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    classes = fuzz_grpc.strategies(meta, MAX_BODY_BYTES)
    sender = fuzz_grpc.GrpcSender(gport)
    sent = 0

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(classes)).flatmap(lambda c: classes[c]))
    def run(case):
        nonlocal sent
        code = sender.send(case)
        codes[case.cls][code] += 1
        if code not in case.expect:
            unexpected[case.cls][code] += 1
        sent += 1
        if sent % 1000 == 0:
            print(f"{sent} gRPC calls", flush=True)

    try:
        run()
    finally:
        sender.close()
    as_dict = lambda d: {c: dict(sorted(v.items())) for c, v in sorted(d.items())}  # noqa: E731
    return as_dict(codes), as_dict(unexpected), sent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=10_000, help="HTTP requests")
    p.add_argument("--grpc-examples", type=int, default=5_000, help="gRPC calls")
    p.add_argument("--work", default="artifacts/fuzz_server")
    p.add_argument("--out", default=str(HERE / "results" / "fuzz_server.json"))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = toy_bundle(work)
    port, gport = bench_serve._free_port(), bench_serve._free_port()
    cmd = [sys.executable, "-m", "runtime.serving", str(bundle), "--port", str(port), "--grpc-port", str(gport),
           "--threads", "1", "--log-level", "warning", "--header-timeout", "3", "--body-timeout", "3",
           "--max-body-mb", str(MAX_BODY_BYTES >> 20)]
    proc = bench_serve.start(cmd, port, work / "server.log")
    try:
        with ProcessHealthProbe(port, interval=0.05) as idle:  # the machine's own noise, no fuzzing
            time.sleep(5)
        load0, t0 = os.getloadavg(), time.perf_counter()
        with RssSampler(proc.pid) as rss, ProcessHealthProbe(port, interval=0.05) as probe:
            per_class, sent = fuzz(port, "toysplit", args.examples, 0)
        http_seconds, load1 = round(time.perf_counter() - t0, 1), os.getloadavg()
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        meta = httpx.get(f"http://127.0.0.1:{port}/v2/models/toysplit", timeout=10).json()
        g_load0, g_t0 = os.getloadavg(), time.perf_counter()
        # the forked HTTP prober starts before this process opens any gRPC channel
        with RssSampler(proc.pid) as g_rss, ProcessHealthProbe(port, interval=0.05) as g_http, \
                ProcessHealthProbe(gport, interval=0.05, grpc=True) as g_probe:
            g_codes, g_unexpected, g_sent = fuzz_grpc_calls(gport, meta, args.grpc_examples)
        g_seconds = round(time.perf_counter() - g_t0, 1)
        g_metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        bench_serve.stop(proc)
    all_status = [s for c in per_class.values() for s in c]
    log_text = (work / "server.log").read_text()
    grpc_out = {
        "count": g_sent, "seconds": g_seconds, "classes": len(g_codes), "per_class": g_codes,
        "internal_or_unknown": sum(n for c in g_codes.values() for k, n in c.items() if k in ("INTERNAL", "UNKNOWN")),
        "unexpected": g_unexpected,
        "internal_errors_in_metrics": 'reason="internal"' in g_metrics,
        "tracebacks_in_server_log": log_text.count("Traceback"),
        "health_grpc": g_probe.summary(), "health_http": g_http.summary(),
        "health_latency_max_ms": max(g_probe.summary()["health_ms_max"], g_http.summary()["health_ms_max"]),
        **g_rss.summary(), "loadavg_start": g_load0, "loadavg_end": os.getloadavg(),
        "max_message_bytes": MAX_BODY_BYTES,
    }
    out = {
        "count": sent, "seconds": http_seconds, "classes": len(per_class),
        "per_class": per_class, "max_status": max(all_status),
        "responses_5xx": sum(n for c in per_class.values() for s, n in c.items() if s >= 500),
        "no_response": sum(n for c in per_class.values() for s, n in c.items() if s <= 0),
        "internal_errors_in_metrics": 'reason="internal"' in metrics,
        "tracebacks_in_server_log": log_text.count("Traceback"),
        "health": probe.summary(), "health_latency_max_ms": probe.summary()["health_ms_max"],
        "health_idle_before": idle.summary(),
        **rss.summary(), "loadavg_start": load0, "loadavg_end": load1,
        "grpc": grpc_out,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    summary = {k: v for k, v in out.items() if k not in ("per_class", "grpc")}
    summary["grpc"] = {k: v for k, v in grpc_out.items() if k != "per_class"}
    print(json.dumps(summary, indent=1))
    failed = (out["responses_5xx"] or grpc_out["internal_or_unknown"] or grpc_out["unexpected"]
              or grpc_out["health_grpc"]["failed"] or grpc_out["health_http"]["failed"] or probe.summary()["failed"]
              or not grpc_out["health_grpc"]["probes"] or not grpc_out["health_http"]["probes"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
