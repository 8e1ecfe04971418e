"""Reproduce the UG-split figures: the `bench` RankMixer student, ONNX Runtime CPU, 2 threads.

    .venv/bin/python benchmarks/bench_split.py [--checkpoint DIR] [--threads 2]

Exports the student (random init unless --checkpoint; latency does not depend on the
weights) into a bundle with user.onnx / group.onnx / full.onnx, checks split parity vs
eager on one request, then runs exporter.bench.run_bench: split vs full vs eager at
N in {1, 16, 128, 512, 2048}, interleaved, medians, FLOP ceiling beside each.
Writes benchmarks/results/bench_split.json and bench_split.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402
from exporter.bench import DEFAULT_NS, print_table, run_bench  # noqa: E402
from exporter.capture import to_torch_inputs  # noqa: E402
from exporter.load import LoadedModel, load_student  # noqa: E402
from exporter.pipeline import ExportOptions, export_bundle  # noqa: E402
from runtime.sample import sample_rows  # noqa: E402
from runtime.spec import FeatureSpec  # noqa: E402


def build(checkpoint: str | None) -> LoadedModel:
    if checkpoint:
        return load_student(checkpoint)
    from students.zoo import build_student

    torch.manual_seed(0)
    model = build_student("rankmixer", "bench").eval()
    return LoadedModel(spec=FeatureSpec.from_dict(model.feature_spec()), module=model)


def parity(bundle: Path, loaded: LoadedModel, n: int = 16) -> float:
    """Max abs error of the split bundle (ORT) vs eager on one request of n candidates."""
    spec = loaded.spec
    scorer = runtime.load(bundle, backend="onnxruntime", allow_unverified=True)
    u, c = sample_rows(spec, 1, 7), sample_rows(spec, n, 8)
    user = {s.name: u[s.name][0] for s in spec.user_inputs}
    cands = {s.name: c[s.name] for s in spec.group_inputs}
    got = scorer.score(user, cands)[spec.outputs[0]]
    full = {**{k: np.repeat(v[None], n, 0) for k, v in user.items()}, **cands}
    with torch.no_grad():
        ref = loaded.eager()(**to_torch_inputs(spec, full)).numpy()
    return float(np.abs(got - ref).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a trained bench RankMixer checkpoint directory")
    p.add_argument("--work", default="/tmp/ugsep_bench_split", help="where the bundle goes")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_NS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seconds-per-n", type=float, default=30.0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = build(args.checkpoint)
    bundle = Path(args.work) / "bundle"
    t0 = time.perf_counter()
    export_bundle(loaded, bundle, ExportOptions(parity=False, overwrite=True))
    print(
        f"exported in {time.perf_counter() - t0:.1f}s; split parity max abs err "
        f"{parity(bundle, loaded):.2e}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_bench(
        bundle,
        tuple(args.n),
        args.threads,
        repeats=args.repeats,
        seconds_per_n=args.seconds_per_n,
        eager=loaded.eager(),
        out_json=out / "bench_split.json",
        out_png=out / "bench_split.png",
    )
    split = json.loads((bundle / "manifest.json").read_text())["split"]
    result["boundary"] = split["boundary"]
    (out / "bench_split.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
