"""Scale benchmark: the ``bench`` RankMixer student at a small and a large vocabulary.

    .venv/bin/python benchmarks/bench_scale.py        # -> benchmarks/results/bench_scale.json

Same dense part, ``--vocabs`` rows per id field (default 100,000 and 3,000,000: a 3.5 GB
checkpoint). The checkpoints are the student *initialised* at that vocabulary from a seed,
not trained (training a 877 M-parameter model is not the point: export, load and serving
cost do not depend on the weights' values); held-out requests are sampled from the spec with
labels drawn from the eager model's own ctr, so ΔAUC measures how much a store dtype moves
the ranking. Every step that is measured runs in its own child process (peak RSS is the
child's ``ru_maxrss``):

    checkpoint   build + save (not measured)
    export       ``ugsep export CKPT --data held.npz``: wall time, peak RSS / checkpoint bytes
    export-int8  the small vocabulary again with ``--embeddings int8``: bytes/fp32, ΔAUC
    serve        ``runtime.load`` time, VmRSS after load and after ``--requests`` (10,000) requests,
                 against dense weights + rows touched + fixed overhead
    latency      both bundles in one process, interleaved per round: median ms at N=1, 200

Top-level keys: ``export_peak_rss_over_checkpoint`` (the large vocabulary),
``latency_large_over_small`` ({"1": r, "200": r}), ``int8_bytes_over_fp32``,
``int8_delta_auc``, ``serving_rss_bound`` (per vocabulary: VmRSS after the requests against
dense weights + rows touched + fixed overhead); per vocabulary the rest under ``runs``; the
export's RSS per pipeline step / parity stage under ``runs.*.export.rss_by_phase_mib``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NS = (1, 200)
WARMUP = 20  # serve: requests before the fixed overhead is read (of --requests)


def _rss_mib() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


def child_checkpoint(vocab: int, size: str, out: str) -> dict:
    import numpy as np
    import torch

    from exporter.steps.capture import to_torch_inputs
    from runtime.sample import sample_requests
    from runtime.spec import FeatureSpec
    from students.checkpoint import save_checkpoint
    from students.data import save_npz
    from students.zoo import FACTORY, build_model, model_kwargs

    kwargs = model_kwargs("rankmixer", size)
    kwargs["config"]["vocab"] = vocab
    torch.manual_seed(0)
    model = build_model(**kwargs).eval()
    spec = model.feature_spec()
    save_checkpoint(model, FACTORY, kwargs, spec, out)
    fs = FeatureSpec.from_dict(spec)
    rows, rid = sample_requests(fs, 20, 200, seed=1)  # held-out: 20 requests x 200
    with torch.no_grad():
        p = model(**to_torch_inputs(fs, rows)).numpy()
    label = (np.random.default_rng(2).random(len(p)) < p).astype(np.int64)
    save_npz(Path(out) / "held.npz", {**rows, "label": label, "request_id": rid})
    n_params = sum(t.numel() for t in model.state_dict().values())
    return {"params": n_params, "checkpoint_bytes": (Path(out) / "model.safetensors").stat().st_size}


class RssTrace:
    """VmRSS / RssAnon / RssFile sampled every ``every`` s in a thread, by phase: each
    ``phase(name)`` starts a new phase; ``peaks()`` is the highest VmRSS of each phase (MiB)
    with the RssAnon / RssFile of that sample, and VmHWM at the phase's end."""

    def __init__(self, every: float = 0.05) -> None:
        import threading

        self.every, self.rows, self.name = every, [], "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        status = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                status[key] = int(line.split()[1]) / 1024
        self.rows.append((self.name, status))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def phase(self, name: str) -> None:
        self._sample()
        self.name = name
        self._sample()

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        self._sample()
        out: dict[str, dict[str, float]] = {}
        for name, st in self.rows:
            top = out.setdefault(name, dict(st))
            if st["VmRSS"] > top["VmRSS"]:
                top.update({k: v for k, v in st.items() if k != "VmHWM"})
            top["VmHWM"] = st["VmHWM"]
        return out


def _traced_pipeline(trace: RssTrace) -> None:
    """Mark each pipeline step (and parity's eager reference / stages) as a phase."""
    import exporter.pipeline as pipeline
    from exporter.steps.parity import check

    def marked(name, fn):
        def step(ctx):
            trace.phase(name)
            return fn(ctx)
        return step

    pipeline.PIPELINE[:] = [(n, marked(n, s)) for n, s in pipeline.PIPELINE]
    run_batched, check_stage = check._run_batched, check._check_stage

    def _run_batched(run, rows, bar, label, chunks):
        if label == "eager fp32":
            trace.phase("parity:eager")
        return run_batched(run, rows, bar, label, chunks)

    def _check_stage(stage, *a, **k):
        trace.phase(f"parity:{stage.name}")
        return check_stage(stage, *a, **k)

    check._run_batched, check._check_stage = _run_batched, _check_stage


def child_export(ckpt: str, out: str, *flags: str) -> dict:
    from exporter.cli import main

    trace = RssTrace()
    _traced_pipeline(trace)
    trace.phase("load")
    t0 = time.perf_counter()
    code = main(["export", ckpt, "--out", out, "--data", str(Path(ckpt) / "held.npz"), "--overwrite", *flags])
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"exit": code, "wall_s": wall, "peak_rss_bytes": peak, "rss_by_phase_mib": trace.stop()}


def _requests(spec, n_requests: int, n: int, seed: int):
    from runtime.sample import sample_requests

    rows, rid = sample_requests(spec, n_requests, n, seed=seed)
    out = []
    for r in range(n_requests):
        idx = rid == r
        out.append(({s.name: rows[s.name][idx][:1] for s in spec.user_inputs},
                    {s.name: rows[s.name][idx] for s in spec.group_inputs}))
    return out


def _rows_touched(scorer, reqs) -> dict[str, int]:
    """Distinct rows each store table is asked for by ``reqs`` (ids + per-field offsets)."""
    import numpy as np

    sec = scorer.manifest.embeddings
    rows: dict[str, list] = {}
    for lk in sec.lookups if sec else []:
        side = 0 if lk.side == "user" else 1
        off = 0 if lk.offsets is None else np.asarray(lk.offsets, np.int64)
        ids = np.concatenate([(r[side][lk.input].astype(np.int64) + off).ravel() for r in reqs])
        rows.setdefault(lk.table, []).append(ids)
    return {t: int(np.unique(np.concatenate(v)).size) for t, v in rows.items()}


def _mapped_rss_mib(path: Path) -> float:
    """Resident MiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    target = str(path.resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's first line
            inside = len(head) >= 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total / 1024


def child_serve(bundle: str, n_requests: int) -> dict:
    """``runtime.load`` time; VmRSS after load and after ``n_requests`` requests (N=1, ids
    uniform over the vocabulary) against the bound: RSS after load and ``WARMUP`` requests
    but the store file's own resident pages (the fixed overhead: the interpreter, ONNX
    Runtime's code and arenas, its sessions holding the dense weights) + the rows touched
    (distinct rows looked up x row bytes). ``store_resident_mib``: the store file's pages
    in this process's RSS (smaps): 0 when it is read with pread."""
    import onnxruntime  # noqa: F401 - in the "imports" figure, not the load time

    import runtime

    imports = _rss_mib()
    t0 = time.perf_counter()
    scorer = runtime.load(bundle, "onnxruntime")
    load_s = time.perf_counter() - t0
    after_load = _rss_mib()
    reqs = _requests(scorer.spec, n_requests, 1, seed=5)  # ids uniform over the vocabulary
    for u, c in reqs[:WARMUP]:  # first runs page ORT's code in and size its arenas
        scorer.score(u, c)
    warm = _rss_mib()
    emb = scorer.manifest.embeddings
    store_file = Path(bundle) / (emb.file if emb else "embeddings.safetensors")
    store_warm = _mapped_rss_mib(store_file)
    t0 = time.perf_counter()
    for u, c in reqs[WARMUP:]:
        scorer.score(u, c)
    serve_s = time.perf_counter() - t0
    after = _rss_mib()
    m = scorer.manifest
    stages = ("user", "group") if scorer.split else ("full",)
    dense = sum(meta.bytes or 0 for rel, meta in m.files.items()
                if any(rel.startswith(f"{st}.onnx") for st in stages)) / 2**20
    touched = _rows_touched(scorer, reqs)
    store = scorer.store.store if scorer.store is not None else None
    row_bytes = {t.name: t.bytes / t.rows for t in (m.embeddings.tables if m.embeddings else [])}
    rows_mib = sum(n * row_bytes[t] for t, n in touched.items()) / 2**20
    fixed = warm["VmRSS"] - dense - store_warm
    bound = fixed + dense + rows_mib
    return {"load_s": load_s, "rss_after_imports_mib": imports, "rss_after_load_mib": after_load,
            "rss_after_warmup_mib": warm, "requests": n_requests, "serve_s": serve_s, "rss_after_requests_mib": after,
            "store_read": None if store is None else ("pread" if store.pread else "mmap"),
            "store_resident_mib": {"after_warmup": store_warm, "after_requests": _mapped_rss_mib(store_file),
                                   "file": store_file.stat().st_size / 2**20 if store_file.is_file() else 0},
            "bound_mib": {"dense_weights": dense, "rows_touched": rows_mib, "fixed_overhead": fixed,
                          "sum": bound, "measured_vmrss": after["VmRSS"],
                          "within": after["VmRSS"] <= bound},
            "rows_touched": touched, "torch_imported": "torch" in sys.modules}


def child_latency(small: str, large: str, rounds: int) -> dict:
    import runtime

    scorers = {"small": runtime.load(small, "onnxruntime"), "large": runtime.load(large, "onnxruntime")}
    reqs = {(v, n): _requests(s.spec, rounds + 3, n, seed=100 + n) for v, s in scorers.items() for n in NS}
    times: dict[str, list[float]] = {f"{v}/{n}": [] for v in scorers for n in NS}
    for r in range(rounds + 3):  # interleaved: small and large alternate every round
        for n in NS:
            for v, s in scorers.items():
                u, c = reqs[(v, n)][r]  # a fresh request (new ids) each round
                t0 = time.perf_counter()
                s.score(u, c)
                if r >= 3:  # warm-up rounds
                    times[f"{v}/{n}"].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_ms": med, "rounds": rounds,
            "throughput_per_s": {k: int(k.split("/")[1]) * 1e3 / m for k, m in med.items()}}


CHILDREN = {"checkpoint": child_checkpoint, "export": child_export, "serve": child_serve, "latency": child_latency}


def run_child(name: str, *args, cache: Path | None = None) -> dict:
    """Run ``name`` in a fresh interpreter; its JSON result is the last line of stdout.

    With ``cache`` (a file), a result recorded there by an earlier run is reused (--resume).
    """
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--child", name, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"bench_scale: child '{name}' failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if cache is not None:
        cache.write_text(json.dumps(result))
    return result


def _delta_auc(bundle: Path) -> dict:
    report = json.loads((bundle / "parity.json").read_text())
    return {s["name"]: s["outputs"]["ctr"].get("delta_auc", s["outputs"]["ctr"].get("abs_delta_auc"))
            for s in report["stages"] if s.get("status") != "skipped"}


def _store_bytes(bundle: Path) -> dict:
    from runtime.manifest import Manifest

    emb = Manifest.read(bundle).embeddings
    return {t.name: {"bytes": t.bytes, "fp32_bytes": t.rows * t.dim * 4} for t in (emb.tables if emb else [])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocabs", type=int, nargs=2, default=[100_000, 3_000_000], metavar=("SMALL", "LARGE"))
    p.add_argument("--size", default="bench", choices=["tiny", "bench"])
    p.add_argument("--work", default="/tmp/ugsep-bench-scale")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_scale.json"))
    p.add_argument("--resume", action="store_true", help="reuse child results recorded in --work")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    done = lambda name: work / f"{name}.json" if args.resume else None  # noqa: E731
    load_before = os.getloadavg()
    runs: dict[str, dict] = {}
    for label, vocab in zip(("small", "large"), args.vocabs, strict=True):
        ckpt, bundle = work / f"ckpt-{vocab}", work / f"bundle-{vocab}"
        have = (ckpt / "model.safetensors").is_file()  # a recorded checkpoint whose file was removed: rebuilt
        run = {"vocab": vocab, **run_child("checkpoint", vocab, args.size, ckpt,
                                           cache=done(f"ckpt-{vocab}") if have else None)}
        run["export"] = run_child("export", ckpt, bundle, cache=done(f"export-{vocab}"))
        run["export"]["peak_rss_over_checkpoint"] = run["export"]["peak_rss_bytes"] / run["checkpoint_bytes"]
        run["store"] = _store_bytes(bundle)
        run["delta_auc_fp32"] = _delta_auc(bundle)
        run["serve"] = run_child("serve", bundle, args.requests, cache=done(f"serve-{vocab}"))
        runs[label] = run
        print(json.dumps({label: run}, indent=1), flush=True)
    small_ckpt = work / f"ckpt-{args.vocabs[0]}"
    int8 = work / f"bundle-{args.vocabs[0]}-int8"
    int8_run = run_child("export", small_ckpt, int8, "--embeddings", "int8", cache=done("export-int8"))
    store8, store32 = _store_bytes(int8), runs["small"]["store"]
    lat = run_child("latency", work / f"bundle-{args.vocabs[0]}", work / f"bundle-{args.vocabs[1]}", args.rounds)
    med = lat["median_ms"]
    int8_auc = _delta_auc(int8)
    result = {
        "export_peak_rss_over_checkpoint": runs["large"]["export"]["peak_rss_over_checkpoint"],
        "latency_large_over_small": {str(n): med[f"large/{n}"] / med[f"small/{n}"] for n in NS},
        "int8_bytes_over_fp32": (sum(t["bytes"] for t in store8.values()) / sum(t["bytes"] for t in store32.values())
                                 if store32 else None),  # None: no table reached the store
        "int8_delta_auc": int8_auc,
        # VmRSS after --requests requests vs dense weights + rows touched + fixed overhead (MiB)
        "serving_rss_bound": {label: {**run["serve"]["bound_mib"], "requests": run["serve"]["requests"],
                                      "store_read": run["serve"]["store_read"]} for label, run in runs.items()},
        "runs": runs,
        "int8_export": {**int8_run, "store": store8},
        "latency": lat,
        "checkpoints": "the bench RankMixer initialised at each vocabulary from seed 0 (not trained)",
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "argv": sys.argv[1:],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in list(result)[:5]}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        fn = CHILDREN[sys.argv[2]]
        raw = sys.argv[3:]
        conv = [int(a) if a.isdigit() else a for a in raw]
        print(json.dumps(fn(*conv)))
        sys.exit(0)
    sys.exit(main())
