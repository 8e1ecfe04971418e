"""Which MatMulNBits accuracy_level for ORT CPU? Measured on a real graph, not assumed.

    .venv/bin/python benchmarks/bench_quant_accuracy_level.py [--onnx full.onnx] [--out FILE]

Variants of one fp32 graph (default: the bench RankMixer student's full.onnx, random init
is fine for speed): fp32 as exported, our canonical fp32, w8a16 MatMulNBits with
accuracy_level 0 (fp32 compute: unpack weights per call) and 4 (int8 activations, VNNI).
Batch 1 and 512, 2 threads, interleaved, medians; max abs difference vs fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graph_passes.onnx import quantize_onnx  # noqa: E402


def _bench_graph() -> onnx.ModelProto:
    import torch

    from exporter.steps.capture import capture, flat_input_names, to_torch_inputs
    from exporter.steps.onnx_build import export_onnx
    from runtime.sample import sample_rows
    from runtime.spec import FeatureSpec
    from students.zoo import build_student

    torch.set_num_threads(1)
    m = build_student("rankmixer", "bench").eval()
    spec = FeatureSpec.from_dict(m.feature_spec())
    names = flat_input_names(spec, to_torch_inputs(spec, sample_rows(spec, 1)))
    return export_onnx(capture(m, spec), names, list(spec.outputs))


def _feeds(
    sess: ort.InferenceSession, batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    out = {}
    for i in sess.get_inputs():
        shape = [batch, *i.shape[1:]]
        if "int64" in i.type:
            out[i.name] = rng.integers(0, 50, size=shape).astype(np.int64)
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", help="fp32 graph (default: export the bench RankMixer)")
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "bench_quant_accuracy_level.json")
    )
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--rounds-512", type=int, default=6)
    args = ap.parse_args(argv)
    fp32 = onnx.load(args.onnx) if args.onnx else _bench_graph()
    ser = ir.serde.serialize_model
    variants = {
        "fp32": fp32,
        "fp32-canonical": ser(quantize_onnx(fp32, target="qdq", only=[]).model),
        "w8a16-acc0": ser(quantize_onnx(fp32, target="ort-cpu", accuracy_level=0).model),
        "w8a16-acc4": ser(quantize_onnx(fp32, target="ort-cpu", accuracy_level=4).model),
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = {
        k: ort.InferenceSession(v.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for k, v in variants.items()
    }
    rng = np.random.default_rng(0)
    result = {"onnxruntime": ort.__version__, "threads": 2, "batches": {}}
    for batch, rounds in ((1, args.rounds), (512, args.rounds_512)):
        feeds = _feeds(sess["fp32"], batch, rng)
        ref = sess["fp32"].run(None, feeds)[0]
        times: dict[str, list[float]] = {k: [] for k in sess}
        for r in range(rounds):
            order = list(sess)[r % len(sess) :] + list(sess)[: r % len(sess)]
            for k in order:
                t0 = time.perf_counter()
                sess[k].run(None, feeds)
                times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["fp32"])
        result["batches"][batch] = {
            k: {
                "median_ms": 1e3 * statistics.median(v),
                "ratio_vs_fp32": statistics.median(v) / base,
                "max_abs_vs_fp32": float(np.abs(sess[k].run(None, feeds)[0] - ref).max()),
            }
            for k, v in times.items()
        }
        for k, v in result["batches"][batch].items():
            print(
                f"batch {batch:>3} {k:<15} {v['median_ms']:9.2f} ms  {v['ratio_vs_fp32']:.2f}x  max|d|={v['max_abs_vs_fp32']:.1e}"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
