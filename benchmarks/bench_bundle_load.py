"""What the bundle checks of issue 18 cost at load time, against what loading already costs.

    .venv/bin/python benchmarks/bench_bundle_load.py [--rows 1000 65536 262144] [--rounds 9]

For bundles whose one stage graph holds an embedding table of R rows x 64 fp32 (0.25 MiB to
64 MiB) plus a small MLP, each round times, interleaved:

    sha256           hashing every listed file (what Bundle.open did before)
    layout           runtime.bundle_checks.check_layout (paths, links, unlisted files)
    graphs           runtime.bundle_checks.check_graphs (graph I/O vs spec, tables vs vocab),
                     reading graphs with runtime.onnx_wire (weights skipped, never copied)
    onnx_load        onnx.load(load_external_data=False) of the same graph: the alternative
                     reader, which parses every weight into memory
    ort_session      onnxruntime.InferenceSession creation: what the backend pays anyway
    verify_ed25519   runtime.signing.verify_manifest with an Ed25519 public key
    verify_hmac      the same with an HMAC-SHA256 secret
    open_verified    Bundle.open(key=ed25519): signature + sha256 + layout + graphs

Medians in ms; ``checks_over_sha256`` = (layout + graphs) / sha256 and
``graphs_over_onnx_load`` = graphs / onnx_load. Writes benchmarks/results/bench_bundle_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.steps.write import BundleWriter  # noqa: E402
from runtime.bundle import Bundle, sha256_file  # noqa: E402
from runtime.bundle_checks import check_graphs, check_layout  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.signing import generate_key, load_key, sign_bundle, verify_manifest  # noqa: E402
from runtime.spec import FeatureSpec  # noqa: E402

DIM = 64


def table_model(rows: int) -> onnx.ModelProto:
    """ids [B, 4] -> Gather(table [rows, 64]) -> flatten -> MatMul -> sigmoid: ctr [B]."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((rows, DIM)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.standard_normal((4 * DIM + 2, 1)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 4 * DIM], np.int64), "flat")
    squeeze = numpy_helper.from_array(np.array([1], np.int64), "axis1")
    nodes = [
        helper.make_node("Gather", ["table", "item_ids"], ["emb"]),
        helper.make_node("Reshape", ["emb", "flat"], ["flat_emb"]),
        helper.make_node("Concat", ["flat_emb", "item_dense"], ["x"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["logit"]),
        helper.make_node("Squeeze", ["logit", "axis1"], ["logit1"]),
        helper.make_node("Sigmoid", ["logit1"], ["ctr"]),
    ]
    graph = helper.make_graph(
        nodes, "table", [
            helper.make_tensor_value_info("item_ids", TensorProto.INT64, ["batch", 4]),
            helper.make_tensor_value_info("item_dense", TensorProto.FLOAT, ["batch", 2]),
        ], [helper.make_tensor_value_info("ctr", TensorProto.FLOAT, ["batch"])],
        [table, w, shape, squeeze],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_bundle(out: Path, rows: int) -> Path:
    spec = FeatureSpec.from_dict({"name": f"table{rows}", "outputs": ["ctr"], "inputs": [
        {"name": "item_ids", "side": "group", "dtype": "int64", "shape": [4], "vocab": rows},
        {"name": "item_dense", "side": "group", "dtype": "float32", "shape": [2]},
    ]})
    w = BundleWriter(out, overwrite=True)
    w.add_stage("full", "full.onnx", table_model(rows))
    w.finish(model_name=spec.name, spec=spec)
    return out


def variants(root: Path, ed, hm) -> dict:
    manifest = Manifest.read(root)
    data = Manifest.read_data(root)
    graph = str(root / "full.onnx")
    return {
        "sha256": lambda: [sha256_file(root / rel) for rel in manifest.files],
        "layout": lambda: check_layout(root, manifest),
        "graphs": lambda: check_graphs(root, manifest),
        "onnx_load": lambda: onnx.load(graph, load_external_data=False),
        "ort_session": lambda: ort.InferenceSession(graph, providers=["CPUExecutionProvider"]),
        "verify_ed25519": lambda: verify_manifest(root, data, ed),
        "verify_hmac": lambda: verify_manifest(root, data, hm),
        "open_verified": lambda: Bundle.open(root, key=ed),
    }


def measure(root: Path, rounds: int, keys: dict) -> dict:
    ed, hm = keys["ed"], keys["hm"]
    sign_bundle(root, keys["ed_private"])
    runs = variants(root, ed, hm)
    hm_sig = root / "manifest.sig"
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):  # interleaved: every variant once per round
        for name, fn in runs.items():
            if name == "verify_hmac":
                sign_bundle(root, keys["hm"])
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
            if name == "verify_hmac":
                sign_bundle(root, keys["ed_private"])
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    checks = med["layout"] + med["graphs"]
    return {
        "bundle_bytes": sum(p.stat().st_size for p in root.iterdir() if p != hm_sig),
        "median_ms": med,
        "checks_over_sha256": round(checks / med["sha256"], 4),
        "graphs_over_onnx_load": round(med["graphs"] / med["onnx_load"], 4),
        "checks_over_ort_session": round(checks / med["ort_session"], 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 65536, 262144])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_bundle_load.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ugsep-bench-load-") as tmp:
        tmp = Path(tmp)
        generate_key(tmp / "ed")
        generate_key(tmp / "hm", algorithm="hmac-sha256")
        keys = {"ed_private": load_key(tmp / "ed"), "ed": load_key(tmp / "ed.pub"),
                "hm": load_key(f"hmac:{tmp / 'hm'}")}
        for rows in args.rows:
            root = write_bundle(tmp / f"b{rows}", rows)
            results[str(rows)] = measure(root, args.rounds, keys)
            print(rows, json.dumps(results[str(rows)]))
    doc = {
        "benchmark": "bench_bundle_load",
        "command": "python benchmarks/bench_bundle_load.py " + " ".join(sys.argv[1:]),
        "rounds": args.rounds, "table_dim": DIM,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "by_table_rows": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
