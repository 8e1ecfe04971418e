"""Does the W8 selection agree with the held-out parity verdict? A sweep over data sizes.

    python benchmarks/sweep_w8_selection.py            # -> benchmarks/results/sweep_w8_selection.json

For two tiny students (trained with ``python -m students.train`` into ``--work`` when
missing) and data files of 1k, 2k, 4k, 8k and 20k rows (requests of 50 candidates drawn
from the students' own synthetic world, students/data.py), export w8a16 with every layer a
candidate (``--quant-min-elements 0``, per-token weights unrolled everywhere, no speed
tuning) and record, for the split path:

- quantized / total layer groups;
- the selected configuration's ΔAUC with its 95% interval on the calibration rows, the
  selection's verdict and how it was decided (interval or logit error: ``mode``);
- the same on the held-out (parity) rows, from parity.json;
- ``selection_passed_heldout_failed``: the selection passed and the held-out verdict of the
  quantized split stage failed (goal: 0), and the same count under the old point-estimate
  rule (|ΔAUC| ≤ budget on each side alone) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = (1000, 2000, 4000, 8000, 20000)
STUDENTS = ("rankmixer", "dcn")
CANDIDATES = 50
STAGE = "onnx-split-w8a16"


def train(kind: str, work: Path) -> Path:
    out = work / kind
    if not (out / "student" / "config.json").exists():
        cmd = [sys.executable, "-m", "students.train", "--kind", kind, "--size", "tiny"]
        subprocess.run([*cmd, "--out", str(out), "--no-control"], check=True, cwd=ROOT)
    return out / "student"


def data_file(kind: str, names: dict[str, str], n_rows: int, work: Path, seed: int) -> Path:
    """``n_rows`` held-out rows (n_rows / 50 requests) from the training world (seed 0)."""
    from students.data import DATA_CONFIGS, World, rename, save_npz

    path = work / "data" / f"{kind}_{n_rows}.npz"
    if not path.exists():
        world_seed = np.random.SeedSequence(0).generate_state(3)[0]
        world = World(DATA_CONFIGS["tiny"], int(world_seed))
        rows = world.requests(n_rows // CANDIDATES, CANDIDATES, seed=seed)
        save_npz(path, rename(rows, names))
    return path


def export_one(ckpt: Path, data: Path, out: Path) -> dict:
    from exporter.data import load_rows
    from exporter.load import load_student
    from exporter.pipeline import ExportOptions, export_bundle
    from exporter.steps.quantize import QuantizeStepOptions
    from exporter.steps.threads import ThreadsOptions

    loaded = load_student(ckpt)
    rows = load_rows(data, loaded.spec)
    options = ExportOptions(
        precision="w8a16",
        data=rows,
        overwrite=True,
        quantize=QuantizeStepOptions(min_elements=0, per_token_stages=("full", "user", "group"), tune=False),
        threads=ThreadsOptions(enabled=False),
    )
    t0 = time.perf_counter()
    ctx = export_bundle(loaded, out, options)
    return {"seconds": time.perf_counter() - t0, "ctx": ctx}


def record(bundle: Path, budget: float) -> dict:
    m = json.loads((bundle / "manifest.json").read_text())
    parity = json.loads((bundle / "parity.json").read_text())
    q = m["quantization"]
    split_rows = [r for r in q["layers"] if r["stage"] in ("user", "group")]
    sel = q["outcome"]["user+group"]
    out_name = m["spec"]["outputs"][0]
    s_out = sel["selected"]["outputs"][out_name]
    held = next(s for s in parity["stages"] if s["name"] == STAGE)
    h_out = held["outputs"][out_name]
    h_ci = h_out.get("delta_auc_ci") or {}
    rec = {
        "layers": len(split_rows),
        "quantized_layers": sum(r["precision"] != "fp32" for r in split_rows),
        "kept_float": len(sel["kept_float"]),
        "selection": {
            "rows": sel["auc_resolution"]["calibration_rows"],
            "delta_auc": s_out.get("delta_auc"),
            "delta_auc_ci": s_out.get("delta_auc_ci"),
            "margin_se": s_out.get("delta_auc_margin_se"),
            "logit_rel_rms": s_out.get("logit_rel_rms"),
            "passed": sel["selected"]["passed"],
            "mode": (s_out.get("auc_verdict") or {}).get("mode"),
            "all_quantized_passed": sel["all_quantized"]["passed"],
        },
        "heldout": {
            "rows": parity["rows"]["n"],
            "delta_auc": h_out.get("delta_auc"),
            "delta_auc_ci": [h_ci.get("ci_low"), h_ci.get("ci_high")] if h_ci else None,
            "logit_rel_rms": h_out.get("logit_rel_rms"),
            "passed": held["status"] == "passed",
            "mode": (h_out.get("auc_verdict") or {}).get("mode"),
            "breaches": held["breaches"],
        },
    }
    sp, hp = rec["selection"], rec["heldout"]
    rec["selection_passed_heldout_failed"] = bool(sp["passed"] and not hp["passed"])
    point_sel = sp["delta_auc"] is not None and abs(sp["delta_auc"]) <= budget
    point_held = hp["delta_auc"] is not None and abs(hp["delta_auc"]) <= budget
    rec["point_rule"] = {"selection_passed": point_sel, "heldout_passed": point_held,
                         "disagree": bool(point_sel and not point_held)}
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--students", nargs="+", default=list(STUDENTS))
    p.add_argument("--work", default="/tmp/ugsep-sweep-w8")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/sweep_w8_selection.json"))
    args = p.parse_args(argv)
    import torch

    from exporter.evaluate.budgets import DEFAULTS

    torch.set_num_threads(2)
    budget = DEFAULTS["w8a16"]["abs_delta_auc"]
    work = Path(args.work)
    results, t0 = [], time.perf_counter()
    for kind in args.students:
        ckpt = train(kind, work)
        from students.checkpoint import load_checkpoint

        names = load_checkpoint(ckpt).input_names  # data keys -> the student's input names
        for i, n in enumerate(args.sizes):
            data = data_file(kind, names, n, work, seed=7000 + i)
            run = export_one(ckpt, data, work / "bundles" / f"{kind}_{n}")
            rec = {"student": kind, "rows": n, "export_seconds": round(run["seconds"], 1),
                   **record(work / "bundles" / f"{kind}_{n}", budget)}
            results.append(rec)
            print(json.dumps({k: rec[k] for k in ("student", "rows", "quantized_layers", "layers",
                                                  "selection_passed_heldout_failed")}), flush=True)
    out = {
        "command": "python benchmarks/sweep_w8_selection.py " + " ".join(argv or sys.argv[1:]),
        "budget_abs_delta_auc": budget,
        "loadavg": os.getloadavg(),
        "seconds": round(time.perf_counter() - t0, 1),
        "cases": results,
        "selection_passed_heldout_failed": sum(r["selection_passed_heldout_failed"] for r in results),
        "point_rule_disagreements": sum(r["point_rule"]["disagree"] for r in results),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}: {out['selection_passed_heldout_failed']} disagreement(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
