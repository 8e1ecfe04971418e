"""Third-party CTR models (deepctr-torch, FuxiCTR layers): export, split, parity and latency.

    .venv/bin/python benchmarks/bench_third_party.py [--n 200] [--threads 2] [--models DeepFM DCN]

Per model, as a user would: train briefly on synthetic rows (tests/third_party.py), save a
``.pt2`` with torch.export, ``ugsep export`` it with the spec and ``--data``; then read the
boundary, the user FLOP share before and after the mixed-layer rewrite, parity (onnx-split
max abs, ΔAUC) from the bundle, and time split vs full with ONNX Runtime CPU at N
candidates (exporter.commands.bench.run_bench: variants interleaved, medians). A model that does not
export gets ✘ and the one-line reason. Writes benchmarks/results/bench_third_party.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.cli import main  # noqa: E402
from exporter.commands.bench import run_bench  # noqa: E402
from tests import third_party as tp  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "bench_third_party.json"


def _share(u: float, g: float) -> float:
    return round(u / (u + g), 4) if u + g else 0.0


def export_one(name: str, work: Path, rows) -> tuple[Path | None, str]:
    """(bundle, '') or (None, the CLI's one-line error)."""
    model = tp.train_briefly(tp.build(name), name, rows)
    spec = tp.deepctr_spec(name) if name in tp.DEEPCTR_MODELS else tp.fuxictr_spec(name)
    (work / f"{name}.json").write_text(json.dumps(spec))
    try:
        tp.save_pt2(model, name, rows, work / f"{name}.pt2")
    except Exception as e:  # noqa: BLE001 - the row says why
        return None, f"torch.export: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    data = work / ("data.npz" if name in tp.DEEPCTR_MODELS else "data_dict.npz")
    out = work / f"bundle_{name}"
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["export", str(work / f"{name}.pt2"), "--spec", str(work / f"{name}.json"),
                   "--data", str(data), "--out", str(out), "--overwrite", "--no-stage-threads"])
    if rc != 0:
        lines = [ln for ln in err.getvalue().splitlines() if "error" in ln.lower()]
        return None, (lines[-1] if lines else f"ugsep export exited {rc}")[:200]
    return out, ""


def describe(name: str, bundle: Path, n: int, threads: int, repeats: int) -> dict:
    m = json.loads((bundle / "manifest.json").read_text())
    report = json.loads((bundle / "split_report.json").read_text())
    report = report.get("report", report)
    f = m["flops"]
    before = report.get("mixed_layers") or {}
    u0 = before.get("user_per_row_before", f["user_per_row"])
    g0 = before.get("group_per_row_before", f["group_per_row"])
    split = m["parity"]["summary"].get("onnx-split", {}).get("outputs", {}).get("ctr", {})
    row = {
        "library": "deepctr-torch" if name in tp.DEEPCTR_MODELS else "fuxictr",
        "model": name,
        "exported": True,
        "split": m["split"] is not None,
        "boundary_tensors": len((m["split"] or {}).get("boundary", [])),
        "flops_per_row": f,
        "user_flop_share_before": _share(u0, g0),
        "user_flop_share_after": _share(f["user_per_row"], f["group_per_row"]),
        "rewritten_layers": len(before.get("rewritten", [])),
        "parity_max_abs": split.get("max_abs"),
        "parity_delta_auc": split.get("delta_auc"),
    }
    res = run_bench(bundle, ns=(n,), threads=threads, repeats=repeats, seconds_per_n=15.0)
    r = res["results"][0]
    row.update({
        "full_ms": r.get("full_ms"), "split_ms": r.get("split_ms"),
        "split_over_full": round(r["split_ms"] / r["full_ms"], 4) if "split_ms" in r else None,
        "flop_ceiling": r.get("ceiling"), "load_average": res["load_average"],
    })
    return row


def main_(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="candidates per request")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--models", nargs="+", default=[*tp.DEEPCTR_MODELS, *tp.FUXICTR_MODELS])
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    rows = tp.synthetic(100, 20, seed=0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.savez(work / "data.npz", **rows)
        np.savez(work / "data_dict.npz", **tp.as_dict_rows(rows))
        for name in args.models:
            bundle, why = export_one(name, work, rows)
            if bundle is None:
                results.append({"model": name, "exported": False, "reason": why})
                continue
            results.append(describe(name, bundle, args.n, args.threads, args.repeats))
            print(json.dumps(results[-1]), flush=True)
    out = {"n": args.n, "threads": args.threads, "backend": "onnxruntime-cpu",
           "load_average_end": os.getloadavg(), "models": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
