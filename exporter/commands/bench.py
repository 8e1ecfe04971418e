"""``ugsep bench BUNDLE``: split vs full (vs eager PyTorch) latency across candidate counts N.

One request = one user and N candidates. For every N the variants run interleaved
in one loop (round-robin, shuffled order each round), so drift on a shared machine
hits all of them alike; each cell reports the median of its repeats. Beside every
measurement sits the FLOP ceiling (U+G)/(U/N+G) from the manifest, and how much of
it the split realised. Results go to JSON and a PNG plot of latency vs N.

    from exporter.commands.bench import run_bench
    run_bench("bundle/", ns=(1, 16, 128, 512, 2048), threads=2,
              out_json="bench.json", out_png="bench.png", eager=model)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

import runtime
from exporter.errors import ExportError
from runtime.ceiling import flop_ceiling
from runtime.sample import sample_requests

log = logging.getLogger(__name__)
DEFAULT_NS = (1, 16, 128, 512, 2048)


def run_bench(
    bundle: str | Path,
    ns: tuple[int, ...] = DEFAULT_NS,
    threads: int = 2,
    *,
    repeats: int = 20,
    seconds_per_n: float = 20.0,
    out_json: str | Path | None = None,
    out_png: str | Path | None = None,
    eager: Any = None,
    seed: int = 0,
    trust: tuple[str, ...] | list[str] = (),
    thread_pool: str = "session",
) -> dict[str, Any]:
    """Benchmark ``bundle``; ``eager`` is the nn.Module (or "auto": rebuild from the manifest,
    importing its factory only from ``trust``-ed modules). ``thread_pool="process"``: full and
    split share ONNX Runtime's process-wide pool (runtime/backends/ort.py; process-wide state:
    run it in a process of its own)."""
    variants = _variants(bundle, threads, eager, trust, thread_pool)
    spec = variants["split"][0].spec if "split" in variants else variants["full"][0].spec
    calls = {n: _calls(variants, spec, n, seed) for n in ns}
    eager_threads = _best_eager_threads(calls[max(ns)].get("eager"), threads)
    load_before = os.getloadavg()[0]
    samples = _measure(calls, repeats, seconds_per_n, seed)
    manifest = next(iter(variants.values()))[0].manifest
    result = _summarise(samples, manifest, threads, str(bundle))
    result["thread_pool"] = thread_pool
    # a shared machine: say how busy it was, so the numbers can be read in context
    result["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    if eager_threads is not None:
        result["eager_threads"] = eager_threads
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    if out_png:
        plot(result, out_png)
    return result


def _variants(bundle, threads: int, eager, trust=(), thread_pool: str = "session") -> dict[str, tuple[Any, Any]]:
    """name -> (scorer or None, callable factory)."""
    opts = {"intra_op_threads": threads, **({"thread_pool": thread_pool} if thread_pool != "session" else {})}
    full = runtime.load(bundle, backend="onnxruntime", allow_unverified=True, use_split=False, **opts)
    out: dict[str, tuple[Any, Any]] = {"full": (full, None)}
    if full.manifest.is_split:
        out["split"] = (runtime.load(bundle, backend="onnxruntime", allow_unverified=True, **opts), None)
    else:
        log.warning("bundle '%s' is not split: only full (and eager) are measured", bundle)
    model = _eager_model(full.manifest, trust) if eager == "auto" else eager
    if model is not None:
        import torch

        torch.set_num_threads(threads)
        out["eager"] = (full, model.eval())
    return out


def _best_eager_threads(call, threads: int) -> int | None:
    """Give eager PyTorch its faster thread count, 1 or ``threads``, probed at the largest N.

    torch's OpenMP pool stalls at every parallel region when another process holds one of
    the cores (a shared 2-core machine: 2 threads measured 70x slower than 1 at N=1), which
    would make the eager baseline look far worse than it is. The choice is recorded.
    """
    if call is None:
        return None
    import torch

    timings = {}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        call()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
        timings[t] = statistics.median(samples)
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best


def _eager_model(manifest, trust: tuple[str, ...] | list[str] = ()) -> Any:
    src = manifest.source
    if not src.checkpoint or not Path(src.checkpoint).exists():
        log.warning("no checkpoint recorded in the manifest: eager PyTorch is not measured")
        return None
    from exporter.load import load_student

    # the manifest is data: its factory is imported only from a trusted module
    return load_student(
        src.checkpoint, spec=manifest.spec, trust=trust,
        factory=src.factory if not Path(src.checkpoint).is_dir() else None,
        factory_from=f"the manifest of bundle '{manifest.model_name}'",
    ).eager()


def _calls(variants, spec, n: int, seed: int) -> dict[str, Any]:
    """One prepared request of n candidates per variant -> a zero-argument callable."""
    rows, _ = sample_requests(spec, 1, n, seed)  # a mixed input keeps one user's columns
    user = {s.name: rows[s.name][0] for s in spec.user_inputs}
    cands = {s.name: rows[s.name] for s in spec.group_inputs}
    out = {}
    for name, (scorer, model) in variants.items():
        prepared = [scorer.prepare(user, cands)]
        if model is None:
            out[name] = lambda s=scorer, p=prepared: s.run_prepared(p)
        else:
            out[name] = _eager_call(model, spec, user, cands, n)
    return out


def _eager_call(model, spec, user, cands, n: int):
    import torch

    from exporter.steps.capture import to_torch_inputs

    full = {**{k: np.repeat(v[None], n, 0) for k, v in user.items()}, **cands}
    kwargs = to_torch_inputs(spec, full)

    def call():
        with torch.inference_mode():
            return model(**kwargs)

    return call


def _measure(calls, repeats: int, seconds_per_n: float, seed: int) -> dict:
    rng = random.Random(seed)
    samples = {n: {v: [] for v in c} for n, c in calls.items()}
    spent = dict.fromkeys(calls, 0.0)
    for c in calls.values():  # warm-up: first runs allocate
        for fn in c.values():
            fn()
            fn()
    for r in range(repeats):
        for n, c in calls.items():
            if r >= 3 and spent[n] > seconds_per_n:
                continue
            order = list(c)
            rng.shuffle(order)
            for v in order:
                t0 = time.perf_counter()
                c[v]()
                dt = time.perf_counter() - t0
                samples[n][v].append(dt * 1e3)
                spent[n] += dt
    return samples


def _summarise(samples, manifest, threads: int, bundle: str) -> dict[str, Any]:
    u, g = manifest.flops.user_per_row, manifest.flops.group_per_row
    rows = []
    for n, per in samples.items():
        med = {v: statistics.median(s) for v, s in per.items() if s}
        row: dict[str, Any] = {"n": n, "repeats": min(len(s) for s in per.values())}
        row.update({f"{v}_ms": round(m, 4) for v, m in med.items()})
        if "split" in med:
            row["speedup"] = round(med["full"] / med["split"], 4)
            if u is not None and g is not None:
                row["ceiling"] = round(flop_ceiling(u, g, n), 4)
                row["fraction_of_ceiling"] = round(row["speedup"] / row["ceiling"], 4)
        if "eager" in med:
            row["eager_over_full"] = round(med["eager"] / med["full"], 4)
        rows.append(row)
    return {
        "bundle": bundle,
        "model": manifest.model_name,
        "threads": threads,
        "backend": "onnxruntime-cpu",
        "flops": manifest.flops.to_dict(),
        "results": rows,
    }


def plot(result: dict[str, Any], out_png: str | Path) -> None:
    """Latency vs N (log-log) and split speedup vs the FLOP ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    ns = [r["n"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v, style in (("full", "o-"), ("split", "s-"), ("eager", "^--")):
        if all(f"{v}_ms" in r for r in rows):
            ax1.plot(ns, [r[f"{v}_ms"] for r in rows], style, label=v)
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="candidates N",
        ylabel="median latency (ms)",
        title=f"{result['model']} · ORT CPU · {result['threads']} threads",
    )
    ax1.legend()
    if all("speedup" in r for r in rows):
        ax2.plot(ns, [r["speedup"] for r in rows], "s-", label="split speedup over full")
        if all("ceiling" in r for r in rows):
            ax2.plot(ns, [r["ceiling"] for r in rows], "k--", label="FLOP ceiling (U+G)/(U/N+G)")
        ax2.set(xscale="log", xlabel="candidates N", ylabel="× faster", title="speedup vs ceiling")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``ugsep bench`` flags."""
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_NS), help="candidate counts")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op / torch threads")
    p.add_argument("--repeats", type=int, default=20, help="max repeats per (variant, N)")
    p.add_argument("--seconds-per-n", type=float, default=20.0, help="time budget per N")
    p.add_argument("--no-eager", action="store_true", help="skip eager PyTorch")
    p.add_argument("--thread-pool", choices=("session", "process"), default="session",
                   help="ONNX Runtime intra-op pools: one per session (default, as served by "
                   "default) or one shared by full and split (ugsep serve --thread-pool process)")
    from exporter.cli import add_trust_argument

    add_trust_argument(p)
    p.add_argument("--json", default="bench.json", help="results JSON path")
    p.add_argument("--png", default="bench.png", help="plot path")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ugsep bench``: prints a table, writes JSON + PNG."""
    if not Path(args.bundle).is_dir():
        raise ExportError(f"bundle '{args.bundle}' is not a directory")
    result = run_bench(
        args.bundle,
        tuple(args.n),
        args.threads,
        repeats=args.repeats,
        seconds_per_n=args.seconds_per_n,
        out_json=args.json,
        out_png=args.png,
        eager=None if args.no_eager else "auto",
        trust=args.trust_module,
        thread_pool=args.thread_pool,
    )
    print_table(result)
    return 0


def print_table(result: dict[str, Any]) -> None:
    from rich.table import Table

    from exporter.progress import console

    cols = ["n", "full_ms", "split_ms", "eager_ms", "speedup", "ceiling", "fraction_of_ceiling"]
    cols = [c for c in cols if any(c in r for r in result["results"])]
    table = Table(title=f"{result['model']}: split vs full ({result['threads']} threads)")
    for c in cols:
        table.add_column(c, justify="right")
    for r in result["results"]:
        table.add_row(*[str(r.get(c, "")) for c in cols])
    console.print(table)
