"""Fuzz ``ugsep serve`` with 10,000+ hostile requests over every class in
tests/serving/fuzz_requests.py; count statuses and probe health throughout.

    python benchmarks/fuzz_server.py                  # 10,000 requests
    python benchmarks/fuzz_server.py --examples 500   # a quick look

The server is a subprocess on 127.0.0.1 (``python -m runtime.serving``, default limits
except 3 s header/body timeouts) serving the serving tests' toy split bundle; Hypothesis
draws the requests (a class, then a request of it); a thread probes ``/v2/health/live``
every 50 ms on a fresh connection (and for 5 s before, idle: the machine's own noise). Writes ``benchmarks/results/fuzz_server.json``: count,
per-class statuses, ``max_status``, ``responses_5xx``, health latency (max, p99), RSS.
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

from tests.serving.fuzz_requests import send, strategies  # noqa: E402
from tests.serving.probe import ProcessHealthProbe  # noqa: E402


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=10_000)
    p.add_argument("--work", default="artifacts/fuzz_server")
    p.add_argument("--out", default=str(HERE / "results" / "fuzz_server.json"))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = toy_bundle(work)
    port = bench_serve._free_port()
    cmd = [sys.executable, "-m", "runtime.serving", str(bundle), "--port", str(port), "--threads", "1",
           "--log-level", "warning", "--header-timeout", "3", "--body-timeout", "3"]
    proc = bench_serve.start(cmd, port, work / "server.log")
    try:
        with ProcessHealthProbe(port, interval=0.05) as idle:  # the machine's own noise, no fuzzing
            time.sleep(5)
        load0, t0 = os.getloadavg(), time.perf_counter()
        with RssSampler(proc.pid) as rss, ProcessHealthProbe(port, interval=0.05) as probe:
            per_class, sent = fuzz(port, "toysplit", args.examples, 0)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        bench_serve.stop(proc)
    all_status = [s for c in per_class.values() for s in c]
    log_text = (work / "server.log").read_text()
    out = {
        "count": sent, "seconds": round(time.perf_counter() - t0, 1), "classes": len(per_class),
        "per_class": per_class, "max_status": max(all_status),
        "responses_5xx": sum(n for c in per_class.values() for s, n in c.items() if s >= 500),
        "no_response": sum(n for c in per_class.values() for s, n in c.items() if s <= 0),
        "internal_errors_in_metrics": 'reason="internal"' in metrics,
        "tracebacks_in_server_log": log_text.count("Traceback"),
        "health": probe.summary(), "health_latency_max_ms": probe.summary()["health_ms_max"],
        "health_idle_before": idle.summary(),
        **rss.summary(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "per_class"}, indent=1))
    return 0 if out["responses_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
