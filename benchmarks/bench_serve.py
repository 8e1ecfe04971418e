"""Serving load benchmark: ``ugsep serve`` (split bundle + user cache + batcher) vs eager PyTorch.

Both servers run as subprocesses on loopback with the same HTTP stack (FastAPI +
uvicorn), the same KServe v2 binary codec and the same compute budget (``--threads``
per graph, one worker). Workload: requests of N candidates whose users are drawn from
a Zipf distribution over a pool of users; ``--concurrency`` closed-loop clients. Each
(variant, concurrency) segment is bounded by ``--duration`` seconds and
``--max-requests``; variants are interleaved and repeated ``--rounds`` times; the
table quotes medians over rounds. JSON goes to ``--out``.

The ``ugsep`` server also serves gRPC (``--grpc-port``): the ``ugsep-grpc`` variant sends the
same requests to the same process as ``tritonclient.grpc`` would (``ModelInfer`` with
``raw_input_contents``), so HTTP vs gRPC differ in transport only (``--no-grpc`` skips it).
``--also w8a8`` (the default) adds the ``ugsep-w8a8`` variant: the same student exported with
``--precision w8a8`` (int8 activations where timed faster, exporter/steps/quantize/w8a8.py),
served over HTTP by its own process.
Around every ugsep segment ``/metrics`` is scraped: ``phase_profile_ms`` is the mean time per
request in each phase (decode, validate, queue, user / cache_hit, group, encode), median
over rounds. ``best_candidates_per_s_over_eager`` is the best ugsep variant's paired ratio at
the highest concurrency. ``os.getloadavg()`` is recorded per segment (shared machines).

    python benchmarks/bench_serve.py                    # RankMixer 'bench' student
    python benchmarks/bench_serve.py --quick            # tiny student, short segments
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.timing import cpu_summary  # noqa: E402
from runtime.sample import sample_input  # noqa: E402
from runtime.serving.protocol import HEADER_LENGTH, kserve_datatype  # noqa: E402
from runtime.spec import FeatureSpec  # noqa: E402


def prepare(work: Path, size: str, checkpoint: str | None, precision: str = "fp32",
            threads: int | None = None) -> tuple[Path, Path, dict]:
    """A checkpoint (given, or the random-init student), its split bundle, and its parity check.

    ``threads``: the servers' --threads, passed to the export as ``serve_threads`` so its speed
    choices are timed as served (w8a8's group graph here: 0.89x fp32 at 1 thread, 0.62x at 2,
    N=200). A bundle already in ``work`` is reused as is."""
    import torch

    from exporter import ExportOptions, export_bundle, load_student
    from exporter.steps.parity.check import check_bundle

    torch.set_num_threads(1)
    ckpt = Path(checkpoint) if checkpoint else work / f"rankmixer-{size}-ckpt"
    if not checkpoint and not (ckpt / "model.safetensors").exists():
        from students.checkpoint import save_checkpoint
        from students.zoo import FACTORY, build_model, model_kwargs

        torch.manual_seed(0)
        kwargs = model_kwargs("rankmixer", size)
        model = build_model(**kwargs).eval()
        save_checkpoint(model, FACTORY, kwargs, model.feature_spec(), ckpt, {"note": "random init (speed only)"})
    bundle = work / f"{ckpt.name}-bundle" if precision == "fp32" else work / f"{ckpt.name}-bundle-{precision}"
    if not (bundle / "manifest.json").exists():
        loaded = load_student(ckpt)
        export_bundle(loaded, bundle, ExportOptions(precision=precision, max_candidates=1024, overwrite=True,
                                                    serve_threads=threads))
        report = check_bundle(bundle, loaded.eager(), n_rows=200, progress=False, localise=False)
        if not report.passed:
            raise SystemExit(f"parity failed for {bundle}; refusing to benchmark it")
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest.get("split") is None:
        raise SystemExit(f"{bundle} is not split; the benchmark needs user.onnx/group.onnx")
    return ckpt, bundle, manifest


def make_requests(spec: FeatureSpec, n_bodies: int, n: int, users: int, zipf: float, seed: int):
    """Request tensors: Zipf-drawn users, fresh candidates each."""
    rng = np.random.default_rng(seed)
    pool = {s.name: sample_input(s, users, rng) for s in spec.user_inputs}
    p = 1.0 / np.arange(1, users + 1) ** zipf
    who = rng.choice(users, size=n_bodies, p=p / p.sum())
    requests = []
    for u in who:
        tensors = {k: v[u : u + 1] for k, v in pool.items()}
        tensors.update({s.name: sample_input(s, n, rng) for s in spec.group_inputs})
        requests.append(tensors)
    return requests, who


def make_bodies(spec: FeatureSpec, n_bodies: int, n: int, users: int, zipf: float, seed: int):
    """Pre-encoded binary KServe requests: Zipf-drawn users, fresh candidates each."""
    requests, who = make_requests(spec, n_bodies, n, users, zipf, seed)
    return [_binary_body(t, list(spec.outputs)) for t in requests], who


def _binary_body(tensors: dict, outputs: list[str]) -> tuple[bytes, str]:
    inputs, blobs = [], []
    for k, v in tensors.items():
        raw = np.ascontiguousarray(v).tobytes()
        inputs.append({"name": k, "shape": list(v.shape), "datatype": kserve_datatype(v.dtype),
                       "parameters": {"binary_data_size": len(raw)}})
        blobs.append(raw)
    head = json.dumps({"inputs": inputs, "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs]})
    return head.encode() + b"".join(blobs), str(len(head.encode()))


async def run_segment(url: str, bodies, start: int, concurrency: int, duration: float, max_requests: int):
    """Closed-loop clients; stops issuing after ``duration`` s or ``max_requests``.

    aiohttp, not httpx: the load generator's own cost is in every latency measured, and
    aiohttp's is ~1.3 ms less per request here (p50 32.1-32.6 vs 33.3-35.7 ms against the
    same ugsep server at N=200, three interleaved rounds of 100 sequential requests).
    """
    import aiohttp

    latencies, failures, issued = [], 0, 0
    t0 = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:

        async def worker():
            nonlocal issued, failures
            while issued < max_requests and time.perf_counter() - t0 < duration:
                body, hlen = bodies[(start + issued) % len(bodies)]
                issued += 1
                t = time.perf_counter()
                async with client.post(url, data=body, headers={HEADER_LENGTH: hlen}) as r:
                    await r.read()
                    ok = r.status == 200
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failures, time.perf_counter() - t0


def grpc_message(model: str, tensors: dict, outputs: list[str]):
    """A ModelInferRequest with raw_input_contents, as tritonclient.grpc builds it."""
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model)
    for k, v in tensors.items():
        req.inputs.add(name=k, datatype=kserve_datatype(v.dtype), shape=list(v.shape))
        req.raw_input_contents.append(np.ascontiguousarray(v).tobytes())
    for o in outputs:
        req.outputs.add(name=o)
    return req


async def run_grpc_segment(target: str, messages, start: int, concurrency: int, duration: float, max_requests: int):
    """``run_segment`` over gRPC: closed-loop clients on one grpc.aio channel."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    latencies, failures, issued = [], 0, 0
    t0 = time.perf_counter()
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def worker():
            nonlocal issued, failures
            while issued < max_requests and time.perf_counter() - t0 < duration:
                msg = messages[(start + issued) % len(messages)]
                issued += 1
                t = time.perf_counter()
                try:
                    await stub.ModelInfer(msg, timeout=300)
                    latencies.append(time.perf_counter() - t)
                except grpc.aio.AioRpcError:
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failures, time.perf_counter() - t0


PHASES = ("decode", "validate", "queue", "user", "cache_hit", "group", "encode")


def phase_totals(metrics_text: str) -> dict[str, tuple[float, float]]:
    """{phase: (sum seconds, count)} of ugsep_phase_seconds over all models."""
    out: dict[str, list[float]] = {}
    for ln in metrics_text.splitlines():
        for kind, i in (("_sum{", 0), ("_count{", 1)):
            if ln.startswith("ugsep_phase_seconds" + kind):
                phase = ln.split('phase="')[1].split('"')[0]
                out.setdefault(phase, [0.0, 0.0])[i] += float(ln.split()[-1])
    return {k: (v[0], v[1]) for k, v in out.items()}


def phase_means_ms(before: dict, after: dict, requests: int) -> dict[str, float]:
    """Mean ms per served request in each phase between two scrapes (0 for phases not seen).

    user and cache_hit are divided by all requests (a request is in one or the other), so the
    phases add up to the mean server-side time of a request."""
    out = {}
    for phase in PHASES:
        s = after.get(phase, (0.0, 0.0))[0] - before.get(phase, (0.0, 0.0))[0]
        out[phase] = 1000 * s / requests if requests else float("nan")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# glibc malloc serves big blocks with mmap and gives them back at free: eager PyTorch then
# page-faults its large activations in on every request, at a cost the VM decides. Measured
# in-process (bench RankMixer, N=200, 1 thread): 176-205 ms per forward with glibc's
# defaults, 151-153 ms with these (what a tuned deployment sets, or jemalloc/tcmalloc). The
# baseline gets its best; ugsep serve (ONNX Runtime keeps its own arena) gets the same.
SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **SERVER_ENV}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not become ready; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def summarise(segments: list[dict]) -> list[dict]:
    rows = []
    for key in sorted({(s["variant"], s["concurrency"]) for s in segments}):
        seg = [s for s in segments if (s["variant"], s["concurrency"]) == key]
        rows.append({
            "variant": key[0], "concurrency": key[1], "rounds": len(seg),
            "candidates_per_s": float(np.median([s["candidates_per_s"] for s in seg])),
            "p50_ms": float(np.median([s["p50_ms"] for s in seg])),
            "p99_ms": float(np.median([s["p99_ms"] for s in seg])),
            "requests": int(sum(s["requests"] for s in seg)), "failures": int(sum(s["failures"] for s in seg)),
        })
    return rows


def paired_ratios(segments: list[dict], variant: str = "ugsep", baseline: str = "eager") -> dict[int, dict]:
    """Per concurrency: median over rounds of (variant / baseline) within the same round."""
    out = {}
    for conc in sorted({s["concurrency"] for s in segments}):
        cps, p99 = [], []
        for rnd in sorted({s["round"] for s in segments}):
            pair = {s["variant"]: s for s in segments if s["concurrency"] == conc and s["round"] == rnd}
            if variant in pair and baseline in pair and pair[baseline]["candidates_per_s"] > 0:
                cps.append(pair[variant]["candidates_per_s"] / pair[baseline]["candidates_per_s"])
                p99.append(pair[variant]["p99_ms"] / pair[baseline]["p99_ms"])
        out[conc] = {"candidates_per_s_ratio": float(np.median(cps)), "p99_ratio": float(np.median(p99)),
                     "candidates_per_s_ratio_range": [float(min(cps)), float(max(cps))]}
    return out


def print_table(rows: list[dict], baseline: str = "eager") -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="serving: candidates/s and latency (medians over rounds)")
    for c in ("variant", "conc", "cand/s", "p50 ms", "p99 ms", "req", "fail", "× eager cand/s", "p99 vs eager"):
        t.add_column(c, justify="right")
    base = {r["concurrency"]: r for r in rows if r["variant"] == baseline}
    for r in rows:
        b = base.get(r["concurrency"])
        ratio = f"{r['candidates_per_s'] / b['candidates_per_s']:.2f}×" if b else "-"
        p99 = f"{r['p99_ms'] / b['p99_ms']:.2f}×" if b else "-"
        t.add_row(r["variant"], str(r["concurrency"]), f"{r['candidates_per_s']:.0f}", f"{r['p50_ms']:.1f}",
                  f"{r['p99_ms']:.1f}", str(r["requests"]), str(r["failures"]), ratio, p99)
    Console().print(t)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="bench", choices=["tiny", "bench"])
    p.add_argument("--checkpoint", default=None, help="a trained RankMixer checkpoint (default: random init)")
    p.add_argument("--work", default="artifacts/bench_serve")
    p.add_argument("--out", default=None, help="JSON results (default: WORK/bench_serve.json)")
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per segment (issuing stops after)")
    p.add_argument("--max-requests", type=int, default=400, help="requests per segment at most")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--users", type=int, default=2000, help="user pool size")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of user popularity")
    p.add_argument("--threads", type=int, default=1, help="compute threads per server (both)")
    p.add_argument("--max-delay-ms", type=float, default=0.0, help="batcher delay of ugsep serve (its default)")
    p.add_argument("--latency-budget-ms", type=float, default=600_000.0,
                   help="ugsep serve's admission budget; default 10 min = no shedding: the closed-loop "
                   "clients compare throughput with the eager server, which sheds nothing (with the "
                   "server's own default, 2x a lone request, concurrency 4 and 16 got 429s)")
    p.add_argument("--also", default="w8a8",
                   help="extra ugsep variants by precision, comma-separated (default w8a8; '' for none)")
    p.add_argument("--no-grpc", action="store_true", help="skip the ugsep-grpc variant")
    p.add_argument("--quick", action="store_true", help="tiny student, 2 rounds of 3 s")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.duration, args.concurrency = "tiny", 2, 3.0, "1,8"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    ckpt, bundle, manifest = prepare(work, args.size, args.checkpoint, threads=args.threads)
    spec = FeatureSpec.from_dict(manifest["spec"])
    tensors, who = make_requests(spec, 1000, args.candidates, args.users, args.zipf, seed=1)
    bodies = [_binary_body(t, list(spec.outputs)) for t in tensors]
    messages = [grpc_message(spec.name, t, list(spec.outputs)) for t in tensors] if not args.no_grpc else []
    del tensors
    py = sys.executable
    bundles = {"ugsep": bundle}
    for precision in filter(None, args.also.split(",")):
        bundles[f"ugsep-{precision}"] = prepare(work, args.size, args.checkpoint, precision, args.threads)[1]
    ports = {name: _free_port() for name in [*bundles, "eager"]}
    grpc_port = _free_port()
    cmds = {
        name: [py, "-m", "runtime.serving", str(b), "--port", str(ports[name]), "--threads",
               str(args.threads), "--max-delay-ms", str(args.max_delay_ms), "--log-level", "warning",
               "--latency-budget-ms", str(args.latency_budget_ms)]
        for name, b in bundles.items()
    }
    if messages:
        cmds["ugsep"] += ["--grpc-port", str(grpc_port)]
    cmds["eager"] = [py, "benchmarks/eager_server.py", "--checkpoint", str(ckpt), "--port", str(ports["eager"]),
                     "--threads", str(args.threads)]
    variants = [*bundles, *(["ugsep-grpc"] if messages else []), "eager"]
    server_of = {v: ("ugsep" if v == "ugsep-grpc" else v) for v in variants}
    procs = {}
    try:
        for name, cmd in cmds.items():
            procs[name] = start(cmd, ports[name], work / f"{name}-server.log")
        url = {n: f"http://127.0.0.1:{p}/v2/models/{spec.name}/infer" for n, p in ports.items()}

        def segment(variant: str, start_at: int, conc: int, duration: float, max_requests: int):
            if variant == "ugsep-grpc":
                return asyncio.run(run_grpc_segment(f"127.0.0.1:{grpc_port}", messages, start_at, conc,
                                                    duration, max_requests))
            return asyncio.run(run_segment(url[variant], bodies, start_at, conc, duration, max_requests))

        for name in variants:  # warm-up (not measured)
            segment(name, 0, 2, 2.0, 6)
        segments, cursor = [], 0
        levels = [int(c) for c in args.concurrency.split(",")]
        for rnd in range(args.rounds):
            for conc in levels:
                order = variants if (rnd + conc) % 2 == 0 else variants[::-1]
                for name in order:
                    metrics_url = f"http://127.0.0.1:{ports[server_of[name]]}/metrics"
                    before = phase_totals(httpx.get(metrics_url).text) if name != "eager" else None
                    lat, fails, wall = segment(name, cursor, conc, args.duration, args.max_requests)
                    cursor += len(lat) + fails
                    lat_ms = np.array(lat) * 1000 if lat else np.array([np.nan])
                    seg = {"variant": name, "concurrency": conc, "round": rnd, "requests": len(lat), "failures": fails,
                           "wall_s": wall, "candidates_per_s": len(lat) * args.candidates / wall,
                           "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
                           "load_avg": os.getloadavg()}
                    if before is not None:
                        after = phase_totals(httpx.get(metrics_url).text)
                        seg["phase_ms"] = phase_means_ms(before, after, len(lat) + fails)
                    segments.append(seg)
                    print(f"round {rnd} conc {conc:3d} {name:10s} {seg['candidates_per_s']:8.0f} cand/s "
                          f"p50 {seg['p50_ms']:7.1f} ms p99 {seg['p99_ms']:7.1f} ms ({len(lat)} req, {fails} failed) "
                          f"load {seg['load_avg'][0]:.1f}", flush=True)
        metrics = httpx.get(f"http://127.0.0.1:{ports['ugsep']}/metrics").text  # the fp32 split server
    finally:
        for proc in procs.values():
            stop(proc)
    rows = summarise(segments)
    print_table(rows)
    paired = {name: paired_ratios(segments, name) for name in variants if name != "eager"}
    for name, ratios in paired.items():
        for conc, r in ratios.items():
            print(f"{name} conc {conc}: {name}/eager candidates/s per round, median {r['candidates_per_s_ratio']:.2f}x "
                  f"(range {r['candidates_per_s_ratio_range'][0]:.2f}-{r['candidates_per_s_ratio_range'][1]:.2f}), "
                  f"p99 ratio {r['p99_ratio']:.2f}")
    profile = phase_profile(segments)
    print_profile(profile)
    top = max(levels)
    best = max(paired, key=lambda v: paired[v][top]["candidates_per_s_ratio"])
    cache = {ln.split("{")[0]: float(ln.split()[-1]) for ln in metrics.splitlines()
             if ln.startswith("ugsep_cache_") and "{" in ln}
    flops = manifest.get("flops") or {}
    u, g, n = flops.get("user_per_row"), flops.get("group_per_row"), args.candidates
    loads = [s["load_avg"][0] for s in segments]
    result = {
        "benchmark": "bench_serve", "student": f"rankmixer-{args.size}", "checkpoint": str(ckpt),
        "best_candidates_per_s_over_eager": paired[best][top]["candidates_per_s_ratio"],
        "best_variant": best, "best_at_concurrency": top,
        "bundles": {k: str(v) for k, v in bundles.items()}, "candidates": n, "users": args.users, "zipf": args.zipf,
        "distinct_users_in_workload": int(len(set(who.tolist()))), "threads": args.threads,
        "server_env": SERVER_ENV,
        "duration_s": args.duration, "max_requests": args.max_requests, "rounds": args.rounds,
        "flops": flops, "flop_ceiling_split": (n * (u + g) / (u + n * g)) if u and g else None,
        "flop_ceiling_cached": ((u + g) / g) if u and g else None,
        "ugsep_cache_at_end": cache, "machine": {"cpus": os.cpu_count(), "cpu": cpu_summary(), "load_avg": os.getloadavg(),
                                                 "load_avg_start": load_start,
                                                 "load_avg_1min_over_segments": [min(loads), float(np.median(loads)),
                                                                                 max(loads)],
                                                 "python": platform.python_version()},
        "summary": rows, "paired_ratios": paired, "phase_profile_ms": profile, "segments": segments,
    }
    out = Path(args.out) if args.out else work / "bench_serve.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def phase_profile(segments: list[dict]) -> dict[str, dict[int, dict[str, float]]]:
    """{variant: {concurrency: {phase: median over rounds of the mean ms per request}}}."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for s in segments:
        if "phase_ms" in s:
            out.setdefault(s["variant"], {}).setdefault(s["concurrency"], []).append(s["phase_ms"])
    return {v: {c: {p: float(np.median([r[p] for r in runs])) for p in PHASES} for c, runs in by_c.items()}
            for v, by_c in out.items()}


def print_profile(profile: dict) -> None:
    print("phase profile, mean ms per request (median over rounds):")
    print(f"{'variant':12s} {'conc':>4s} " + " ".join(f"{p:>9s}" for p in PHASES))
    for v, by_c in profile.items():
        for c, ph in sorted(by_c.items()):
            print(f"{v:12s} {c:4d} " + " ".join(f"{ph[p]:9.2f}" for p in PHASES))


if __name__ == "__main__":
    sys.exit(main())
