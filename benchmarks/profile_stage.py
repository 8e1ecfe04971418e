"""Where a bundle stage's time goes in ONNX Runtime: per op type and per node, and an A/B.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/profile_stage.py BUNDLE [--stage group] \
        [--n 200] [--threads 1] [--runs 20] [--against OTHER_BUNDLE] [--optimized OUT.onnx]

Runs the stage on one user's rows (the user graph's boundary for a group stage; ``--n``
candidates; ids sampled from the spec) through the runtime's own ORT session options
(``OrtBackend.session_options``: spinning off, the disabled fusions), with ORT's
``enable_profiling``, and prints the kernel time per op type (ORT's fused names: Gemm,
FusedGemm, ...) and the slowest nodes, per run. ``--optimized`` writes the graph ORT actually
runs (``optimized_model_filepath``). ``--against`` times the same stage of another bundle on
the same inputs, interleaved (medians of ``--runs`` rounds), and prints both, their ratio and
the largest output difference: the before/after measurement of a graph change that does not
depend on how loaded the machine is at the moment as much as two separate runs do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402
from runtime.backends.ort import OrtBackend  # noqa: E402
from runtime.sample import sample_rows  # noqa: E402


def stage_feeds(bundle: str, stage: str, n: int, seed: int = 5) -> dict[str, np.ndarray]:
    """Inputs of ``stage`` for one user and ``n`` candidates, as the scorer would feed them."""
    scorer = runtime.load(bundle, backend="onnxruntime", allow_unverified=True)
    spec = scorer.spec
    rows = sample_rows(spec, n, seed)
    user = {s.name: rows[s.name][:1] for s in spec.user_inputs}
    if stage == "user":
        return scorer.lookup(user, "user")
    cands = scorer.lookup({s.name: rows[s.name] for s in spec.group_inputs}, "group")
    if stage == "group":
        return {**scorer.run_user(user), **cands, "user_index": np.zeros(n, np.int64)}
    users = scorer.lookup({k: np.repeat(v, n, 0) for k, v in user.items()}, "user")
    return {**users, **cands}


def session(bundle: str, stage: str, threads: int, **options) -> ort.InferenceSession:
    so = OrtBackend(intra_op_threads=threads).session_options()
    for key, value in options.items():
        setattr(so, key, value)
    return ort.InferenceSession(str(Path(bundle) / f"{stage}.onnx"), so, providers=["CPUExecutionProvider"])


def _only(sess: ort.InferenceSession, feeds: dict) -> dict:
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def profile(sess: ort.InferenceSession, feeds: dict, runs: int, top: int) -> dict:
    for _ in range(3):
        sess.run(None, feeds)
    t = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feeds)
    wall = (time.perf_counter() - t) / runs
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    by_type, by_node, count = Counter(), Counter(), Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_type[e["args"]["op_name"]] += e["dur"]
            by_node[e["name"][: -len("_kernel_time")]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    calls = runs + 3
    total = sum(by_type.values()) or 1
    return {
        "wall_ms": round(wall * 1e3, 3),
        "op_types": {k: {"ms": round(v / calls / 1e3, 3), "share": round(v / total, 4),
                         "nodes": count[k] // calls} for k, v in by_type.most_common()},
        "top_nodes": {k: round(v / calls / 1e3, 3) for k, v in by_node.most_common(top)},
    }


def interleaved(sessions: list[tuple[ort.InferenceSession, dict]], rounds: int, per: int = 3) -> list[float]:
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, (sess, feeds) in enumerate(sessions):
            t = time.perf_counter()
            for _ in range(per):
                sess.run(None, feeds)
            times[i].append((time.perf_counter() - t) / per)
    return [float(np.median(t)) * 1e3 for t in times]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--stage", default="group", choices=["group", "user", "full"])
    p.add_argument("--n", type=int, default=200, help="candidates (rows of the full stage)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--top", type=int, default=15, help="slowest nodes listed")
    p.add_argument("--against", help="another bundle: time its stage interleaved with this one")
    p.add_argument("--optimized", help="write the graph ORT runs (after its own fusions) here")
    args = p.parse_args(argv)
    feeds = stage_feeds(args.bundle, args.stage, args.n)
    out: dict = {"bundle": args.bundle, "stage": args.stage, "n": args.n, "threads": args.threads,
                 "loadavg": list(os.getloadavg())}
    extra = {"optimized_model_filepath": args.optimized} if args.optimized else {}
    sess = session(args.bundle, args.stage, args.threads, enable_profiling=True,
                   profile_file_prefix=str(Path("/tmp") / f"ugsep_profile_{os.getpid()}"), **extra)
    out["profile"] = profile(sess, _only(sess, feeds), args.runs, args.top)
    if args.against:
        a = session(args.bundle, args.stage, args.threads)
        b = session(args.against, args.stage, args.threads)
        pair = [(a, _only(a, feeds)), (b, _only(b, feeds))]
        ya, yb = (s.run(None, f)[0] for s, f in pair)
        ms = interleaved(pair, args.runs)
        out["against"] = {"bundle": args.against, "this_ms": round(ms[0], 3), "other_ms": round(ms[1], 3),
                          "other_over_this": round(ms[1] / ms[0], 4),
                          "max_abs_diff": float(np.abs(ya - yb).max())}
    out["loadavg_end"] = list(os.getloadavg())
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
