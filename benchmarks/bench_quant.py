"""W8A16 on ONNX Runtime CPU: fp32 split bundle vs ours vs ORT's own MatMulNBitsQuantizer.

    .venv/bin/python benchmarks/bench_quant.py [--checkpoint DIR] [--out FILE] [--rounds R]

Variants (each a user.onnx + group.onnx pair, or full.onnx when the model has no split):

    fp32            the split bundle as exported (the baseline)
    fp32-canonical  our canonicalisation only (Gemm -> MatMul, per-token chains unrolled to
                    2-D MatMuls), still fp32: what canonicalisation costs or buys by itself
    ours-w8a16      exporter.steps.quantize at its ort-cpu defaults, i.e. `ugsep export --precision
                    w8a16` (sensitivity-selected int8, MatMulNBits accuracy_level=4) with the
                    speed choices timed per stage on this CPU (exporter/timing.py, exporter/steps/quantize/speed.py: which
                    weights are big enough to pay, whether per-token FFN weights are unrolled
                    and quantized; user side at batch 1, group and full at 256); the choice
                    is in the JSON under selection.speed_tuning. When the tuner also built a
                    group_small graph (the group tuned at 1 candidate), calls of up to its
                    max_rows candidates run it, as the runtime's Scorer does
    ours-w8a16-one-group  the same bundle without group_small: every call on the group graph
    ours-w8a16-small-only the same bundle with group_small on every call (its accuracy: the
                    accuracy rows are scored in one large call, which ours-w8a16 runs on the
                    group graph; and what group_small would cost at N=512)
    ours-w8a16-pt-all  NBITS_MIN_ELEMENTS with per-token weights quantized in every stage (the
                    group too): shows what that choice costs at N=512
    ours-w8a16-2d   NBITS_MIN_ELEMENTS with no batched per-token weight quantized (only 2-D
                    layers, e.g. the user side's [1024, 1024] linears): is unrolling per-token
                    FFNs worth it? A stage whose per-token weights the export's optimize step
                    already unrolled (exporter/steps/optimize.py) has them as 2-D layers here too.
    ort-default     onnxruntime.quantization.MatMulNBitsQuantizer at its defaults (4-bit,
                    block 128, asymmetric) on the same fp32 graphs: the peer to beat
    ort-8bit        the same quantizer with bits=8, symmetric, accuracy_level=4
    ort-default+canon  ORT's quantizer at defaults on our canonicalised fp32 graphs

A request is one user and N candidates: user graph at M=1, group graph at N (as the
runtime's split path). Latency: 2 intra-op threads, variants interleaved round by round,
medians. Every variant, the fp32 baseline included, gets the export's thread choice
(exporter/steps/threads.py: its user and group_small graphs timed at batch 1 on 2 and 1
threads, the faster kept, as the runtime then runs them); the choice is in the JSON under
stage_threads. Accuracy: every variant vs the EAGER fp32 model on held-out synthetic requests
(disjoint from the rows the selection calibrated on): |ΔAUC|, mean top-10 overlap, max abs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.evaluate.metrics import output_metrics, request_groups  # noqa: E402
from exporter.evaluate.stages import eager_outputs, user_rows  # noqa: E402
from exporter.steps.quantize import Calibration, QuantizeOptions, quantize_bundle_stages  # noqa: E402
from exporter.steps.threads import choose_stage_threads  # noqa: E402
from graph_passes.onnx import linear_weight_bytes, quantize_onnx  # noqa: E402
from graph_passes.onnx.pipelines import NBITS_MIN_ELEMENTS  # noqa: E402
from runtime.backends.ort import OrtBackend  # noqa: E402

CANDIDATES = 100
THREADS = 2  # intra-op threads: every variant is served, and the bundle exported, with these
WARM_BLOCK = 6  # warm latency: requests in a row per variant per round (the first dropped)


def _load(args):
    from exporter.load import LoadedModel, load_student

    if args.checkpoint:
        return load_student(args.checkpoint)
    if args.untrained:  # smoke runs only: accuracy numbers of a random model mean little
        from runtime.spec import FeatureSpec
        from students.zoo import build_student

        m = build_student("rankmixer", args.size).eval()
        return LoadedModel(spec=FeatureSpec.from_dict(m.feature_spec()), module=m)
    from students.train import distill

    out = Path(args.work) / f"student-{args.size}"
    if not (out / "student" / "model.safetensors").exists():
        distill("rankmixer", args.size, out, progress=False)
    return load_student(out / "student")


def _held_out(size: str, n_requests: int, seed: int):
    from students.data import make_dataset

    _, _, held = make_dataset(
        size, n_train=1, n_requests=n_requests, candidates=CANDIDATES, seed=seed
    )
    return held


def _take(rows, lo, hi):
    return {k: v[lo:hi] for k, v in rows.items()}


def _export_fp32(loaded, work: Path) -> dict[str, onnx.ModelProto]:
    """The fp32 bundle as `ugsep export --serve-threads 2` writes it (the threads measured here)."""
    from exporter.pipeline import ExportOptions, export_bundle

    options = ExportOptions(
        precision="fp32", parity=False, overwrite=True, serve_threads=THREADS
    )
    ctx = export_bundle(loaded, work / "fp32", options)
    return dict(ctx.stages)


def _ort_peer(proto: onnx.ModelProto, **kw) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(proto.SerializeToString()), **kw)
    q.process()
    return q.model.model


def _variants(stages, spec, calib) -> tuple[dict, dict]:
    names = ("user", "group") if "user" in stages else ("full",)
    fp32 = {k: stages[k] for k in names}
    from onnx_ir import serde

    small = NBITS_MIN_ELEMENTS
    canon = {
        k: serde.serialize_model(quantize_onnx(v, target="qdq", only=[], min_elements=small).model)
        for k, v in fp32.items()
    }
    ours, record = quantize_bundle_stages(
        stages,
        spec,
        # the ORT-CPU defaults: tuned on this CPU, with the threads measured here
        options=QuantizeOptions("w8a16", "ort-cpu", tune_threads=THREADS),
        calibration=calib,
    )
    pt_all, _ = quantize_bundle_stages(
        stages,
        spec,
        options=QuantizeOptions(
            "w8a16", "ort-cpu", min_elements=small, per_token_stages=("full", "user", "group")
        ),
        calibration=calib,
    )
    only_2d, _ = quantize_bundle_stages(
        stages,
        spec,
        options=QuantizeOptions("w8a16", "ort-cpu", min_elements=small, per_token_stages=()),
        calibration=calib,
    )
    small = {"group_small": ours["group_small"]} if "group_small" in ours else {}
    return {
        "fp32": fp32,
        "fp32-canonical": canon,
        "ours-w8a16": {**{k: ours[k] for k in names}, **small},
        **(
            {
                "ours-w8a16-one-group": {k: ours[k] for k in names},
                "ours-w8a16-small-only": {"user": ours["user"], "group": ours["group_small"]},
            }
            if small
            else {}
        ),
        "ours-w8a16-pt-all": {k: pt_all[k] for k in names},
        "ours-w8a16-2d": {k: only_2d[k] for k in names},
        "ort-default": {k: _ort_peer(v) for k, v in fp32.items()},
        "ort-8bit": {
            k: _ort_peer(v, bits=8, is_symmetric=True, accuracy_level=4) for k, v in fp32.items()
        },
        # the peer given our canonicalisation (it skips Einsum/Gemm on the graphs as exported)
        "ort-default+canon": {k: _ort_peer(v) for k, v in canon.items()},
    }, record


class _Pair:
    """Sessions of one variant; ``score(users, cands, user_index)`` runs it as the runtime does."""

    def __init__(
        self,
        protos: dict[str, onnx.ModelProto],
        small_rows: int = 0,
        threads: dict[str, int] | None = None,
    ) -> None:
        # the runtime's own session settings (no thread spinning, per-stage thread caps...):
        # measured as served
        self.small_rows = small_rows if "group_small" in protos else 0
        backend = OrtBackend(intra_op_threads=THREADS)
        self.sess = {
            k: ort.InferenceSession(
                p.SerializeToString(),
                backend.session_options((threads or {}).get(k)),
                providers=["CPUExecutionProvider"],
            )
            for k, p in protos.items()
        }
        self.inputs = {k: [i.name for i in s.get_inputs()] for k, s in self.sess.items()}

    def _run(self, stage, feeds):
        s = self.sess[stage]
        return dict(
            zip(
                [o.name for o in s.get_outputs()],
                s.run(None, {n: feeds[n] for n in self.inputs[stage]}),
                strict=True,
            )
        )

    def score(self, users, cands, user_index):
        if "full" in self.sess:
            feeds = {**{k: v[user_index] for k, v in users.items()}, **cands}
            return self._run("full", feeds)
        boundary = self._run("user", users)
        group = "group_small" if len(user_index) <= self.small_rows else "group"
        return self._run(group, {**cands, **boundary, "user_index": user_index})


def _request(spec, rows, n: int):
    """One user and n candidates (candidates cycled from held-out rows of that user's request)."""
    idx = np.arange(n) % CANDIDATES
    users = {s.name: rows[s.name][:1] for s in spec.inputs if s.side in ("user", "mixed")}
    cands = {s.name: rows[s.name][idx] for s in spec.group_inputs}
    return users, cands, np.zeros(n, dtype=np.int64)


def _latency(pairs, spec, rows, n: int, rounds: int, block: int = 1) -> dict[str, dict[str, float]]:
    """Median request latency per variant, variants interleaved round by round.

    ``block=1`` (cold): one request per variant per round, so every request starts with the
    other variants' weights in the CPU caches (a host serving many models). ``block=k`` (warm):
    k requests in a row per variant per round, the first dropped (it pays for what the previous
    variant left in cache): the steady state of a server running one model, where a bundle
    whose weights fit in the last-level cache keeps them there between requests.
    """
    req = _request(spec, rows, n)
    times = {k: [] for k in pairs}
    for p in pairs.values():
        for _ in range(3):
            p.score(*req)
    order = list(pairs)
    for r in range(rounds):
        for k in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
            for j in range(block):
                t0 = time.perf_counter()
                pairs[k].score(*req)
                if block == 1 or j > 0:
                    times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["fp32"])
    return {
        k: {
            "median_ms": 1e3 * statistics.median(v),
            "p90_ms": 1e3 * float(np.percentile(v, 90)),
            "ratio_vs_fp32": statistics.median(v) / base,
            "rounds": rounds,
            "requests_timed": len(v),
        }
        for k, v in times.items()
    }


def _accuracy(pairs, spec, rows, reference, labels, rids) -> dict[str, dict]:
    users, user_index = user_rows(spec, rows)
    cands = {s.name: rows[s.name] for s in spec.group_inputs}
    groups = request_groups(rids)
    out = {}
    for k, p in pairs.items():
        got = p.score(users, cands, user_index)
        m = output_metrics(
            reference["ctr"], got["ctr"].reshape(reference["ctr"].shape), labels, groups
        )
        out[k] = {
            "max_abs": m["max_abs"],
            "mean_abs": m["mean_abs"],
            "auc_eager": m.get("auc_ref"),
            "delta_auc": m.get("delta_auc"),
            "top10_overlap_mean": (m.get("top10_overlap") or {}).get("mean"),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="trained student dir (default: train the bench RankMixer)")
    ap.add_argument("--work", default="/tmp/ugsep_bench_quant")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_quant.json"))
    ap.add_argument("--rounds", type=int, default=300, help="rounds at N=1 (cheap: noise needs many)")
    ap.add_argument("--rounds-512", type=int, default=12)
    ap.add_argument(
        "--requests", type=int, default=20, help="held-out requests for accuracy (x100 rows)"
    )
    ap.add_argument("--size", default="bench", choices=["tiny", "bench"])
    ap.add_argument(
        "--data-seed", type=int, default=0, help="world seed: the one the student was trained on"
    )
    ap.add_argument(
        "--untrained", action="store_true", help="random-init student (smoke test only)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    loaded = _load(args)
    spec, model = loaded.spec, loaded.eager().eval()
    held = _held_out(args.size, 2 * args.requests, seed=args.data_seed)
    n_eval = args.requests * CANDIDATES
    evaluation, calib_rows = _take(held, 0, n_eval), _take(held, n_eval, 2 * n_eval)
    ref_eval = eager_outputs(model, spec, {s.name: evaluation[s.name] for s in spec.inputs})
    ref_cal = eager_outputs(model, spec, {s.name: calib_rows[s.name] for s in spec.inputs})
    calib = Calibration(
        {s.name: calib_rows[s.name] for s in spec.inputs},
        ref_cal,
        calib_rows["label"],
        calib_rows["request_id"],
    )
    stages = _export_fp32(loaded, work)
    t0 = time.perf_counter()
    variants, record = _variants(stages, spec, calib)
    select_s = time.perf_counter() - t0
    small_rows = (record.get("group_small") or {}).get("max_rows", 0)
    threads, pairs = {}, {}
    for k, v in variants.items():  # the export's thread choice, for every variant alike
        chosen, rows, rec = choose_stage_threads(
            v, THREADS, group_small_rows=small_rows if "group_small" in v else 0
        )
        threads[k] = {"chosen": chosen, "group_small_rows": rows, "timed": rec["stages"]}
        pairs[k] = _Pair(v, rows, chosen)
    result = {
        "env": {
            "onnxruntime": ort.__version__,
            "threads": THREADS,
            "cpu": platform.processor() or platform.machine(),
            "split": "user" in stages,
            "model": spec.name,
            "trained": not args.untrained,
            "argv": sys.argv[1:],
        },
        "weight_bytes": {
            k: {
                s: linear_weight_bytes(__import__("onnx_ir").serde.deserialize_model(p))
                for s, p in v.items()
            }
            for k, v in variants.items()
        },
        "selection": {
            "seconds": select_s,
            "kept_float": record["kept_float"],
            "kept_float_for_speed": record["kept_float_for_speed"],
            "layers": record["layers"],
            "outcome": record.get("outcome"),
            "weight_bytes": record["weight_bytes"],
            "scheme": record["scheme"],
            "speed_tuning": record.get("speed_tuning"),
            "group_small": record.get("group_small"),
        },
        "stage_threads": threads,
        "accuracy": _accuracy(
            pairs,
            spec,
            {s.name: evaluation[s.name] for s in spec.inputs},
            ref_eval,
            evaluation["label"],
            evaluation["request_id"],
        ),
        "latency": {
            "N=1": _latency(pairs, spec, evaluation, 1, args.rounds),
            "N=512": _latency(pairs, spec, evaluation, 512, args.rounds_512),
            "N=1 warm": _latency(pairs, spec, evaluation, 1, args.rounds, WARM_BLOCK),
            "N=512 warm": _latency(pairs, spec, evaluation, 512, args.rounds_512, WARM_BLOCK),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    _print(result)
    return 0


def _print(result) -> None:
    lat = result["latency"]
    cols = [c for c in ("N=1", "N=512", "N=1 warm", "N=512 warm") if c in lat]
    print(f"{'variant':<22}" + "".join(f"{c + ' ms':>14}{'ratio':>7}" for c in cols)
          + f"{'dAUC':>11}{'top10':>7}{'max_abs':>9}")
    for k, a in result["accuracy"].items():
        times = "".join(
            f"{lat[c][k]['median_ms']:>14.2f}{lat[c][k]['ratio_vs_fp32']:>7.2f}" for c in cols
        )
        print(
            f"{k:<22}{times}{(a['delta_auc'] or 0):>11.2e}{(a['top10_overlap_mean'] or 0):>7.3f}"
            f"{a['max_abs']:>9.2e}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
