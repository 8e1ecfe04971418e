"""Run every benchmark in sequence (each as a subprocess with its own CLI) and summarise them.

    .venv/bin/python benchmarks/run_all.py                 # full: the settings behind benchmarks/results
    .venv/bin/python benchmarks/run_all.py --quick         # smoke run, a few minutes, artifacts/bench-quick/
    .venv/bin/python benchmarks/run_all.py --only split serve
    .venv/bin/python benchmarks/run_all.py --summary-only  # rebuild SUMMARY.md from the JSON in --out

One distilled RankMixer student (``bench`` size; ``tiny`` with ``--quick``) is trained
first and handed to every benchmark that takes ``--checkpoint``, so it is trained once
(``--checkpoint DIR`` skips training). Each benchmark writes its JSON into ``--out``;
then ``summary.json`` and ``SUMMARY.md`` collect the headline ratios of each. A failing
benchmark is reported (exit code, log) and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK_DIR = ROOT / "artifacts" / "bench-quick"
# lines kept in the log but not echoed: per-node chatter of ORT's quantizer, torch.onnx notes
NOISE = ("matmul_nbits_quantizer [INFO]", "torchvision is not installed")


class SummaryError(Exception):
    """A result file cannot be summarised (missing, or its schema is not the one expected)."""


@dataclass(frozen=True)
class Context:
    """What the argument builders need: mode, directories, the shared student."""

    quick: bool
    out: Path
    work: Path
    checkpoint: Path | None

    @property
    def size(self) -> str:
        return "tiny" if self.quick else "bench"


# ---------------------------------------------------------------- the benchmarks


def _ckpt(ctx: Context) -> list[str]:
    return ["--checkpoint", str(ctx.checkpoint)] if ctx.checkpoint else []


def _split_args(ctx: Context) -> list[str]:
    args = [*_ckpt(ctx), "--work", str(ctx.work / "split"), "--out", str(ctx.out)]
    # full: the script's defaults (N 1..2048, 20 repeats, 30 s per N), as committed
    return args + (
        ["--n", "1", "16", "128", "--repeats", "5", "--seconds-per-n", "4"] if ctx.quick else []
    )


def _gemv_args(ctx: Context) -> list[str]:
    args = ["--out", str(ctx.out / "gemv_m1.json")]
    bundle = ctx.work / "split" / "bundle"  # the N=16 bound needs split's fp32 bundle, when it ran
    if (bundle / "manifest.json").exists():
        args += ["--bundle", str(bundle)]
    return args + (["--rounds", "5"] if ctx.quick else [])


def _accuracy_level_args(ctx: Context) -> list[str]:
    args = ["--out", str(ctx.out / "bench_quant_accuracy_level.json")]
    full_onnx = ctx.work / "split" / "bundle" / "full.onnx"  # reuse split's export when it ran
    if full_onnx.exists():
        args += ["--onnx", str(full_onnx)]
    return args + (
        ["--rounds", "5", "--rounds-512", "2"]
        if ctx.quick
        else ["--rounds", "60", "--rounds-512", "6"]
    )


def _quant_args(ctx: Context) -> list[str]:
    args = [*_ckpt(ctx), "--size", ctx.size, "--work", str(ctx.work / "quant")]
    args += ["--out", str(ctx.out / "bench_quant.json"), "--data-seed", "0"]
    if ctx.quick:
        return args + ["--rounds", "5", "--rounds-512", "2", "--requests", "3"]
    # the committed argv (100 requests: 10000 rows, so |dAUC| is not sampling noise)
    return args + ["--rounds", "300", "--rounds-512", "12", "--requests", "100"]


def _serve_args(ctx: Context, name: str) -> list[str]:
    args = [*_ckpt(ctx), "--size", ctx.size, "--work", str(ctx.work / name)]
    args += ["--out", str(ctx.out / f"bench_{name}.json")]
    # full: N=200, Zipf 1.1 over 2000 users, concurrency 1/4/16, 3 rounds of 8 s (defaults)
    return args + (["--quick"] if ctx.quick else [])


def _moe_args(ctx: Context) -> list[str]:
    args = ["--out", str(ctx.out / "bench_moe.json")]
    # full: the script's defaults (E 8/16 x k 1/2, 15 rounds at N=200, 150 at M=1), as committed;
    # quick: the headline config only, a few rounds (the bench student's capture dominates)
    return args + (["--experts", "16", "--top-k", "2", "--rounds", "3"] if ctx.quick else [])


@dataclass(frozen=True)
class Benchmark:
    """One script, how to call it, the JSON it writes and how to summarise that JSON."""

    name: str
    script: str
    result: str
    args: Callable[[Context], list[str]]
    summarise: Callable[[dict], dict]


# ---------------------------------------------------------------- summaries (pure, on the JSON)


def summarise_split(d: dict) -> dict:
    """Split vs full ORT latency per N, against the FLOP ceiling."""
    rows = {
        str(r["n"]): {
            "speedup": r["speedup"],
            "ceiling": r["ceiling"],
            "fraction_of_ceiling": r["fraction_of_ceiling"],
            "split_ms": r["split_ms"],
            "full_ms": r["full_ms"],
        }
        for r in d["results"]
    }
    return {"threads": d["threads"], "load_average": d["load_average"], "per_n": rows,
            "cpu": d.get("cpu")}


def summarise_gemv_m1(d: dict) -> dict:
    """GEMV rates at M=1, per-token layouts, and (with a bundle) the N=16 bound they give."""
    n16 = d.get("n16")
    keys = ("fraction_of_ceiling_n16_stages", "fraction_of_ceiling_n16_best_gemv_bound",
            "user_m1_kernel_ms", "group_n16_gflops", "group_ms_for_0_8_with_best_gemv_user")
    return {
        "threads": d["gemv"]["threads"],
        "gemv_gb_per_s": d["gemv"]["gb_per_s"],
        "ort_gemv_over_best": d["ort_gemv_over_best"],
        "per_token_batched_over_unrolled": {k: v["batched_over_unrolled"] for k, v in d["per_token"].items()},
        "n16": {k: n16[k] for k in keys} if n16 else None,
        # share of the group graph's FLOPs that need no boundary tensor (older runs lack it)
        "group_boundary_free_flop_share": (n16.get("group_boundary_free") or {}).get("free_flop_share") if n16 else None,
        # the memory roofline per thread count (older runs lack it)
        "roofline": n16.get("roofline") if n16 else None,
        "cpu": d.get("cpu"),
    }


def _bytes_ratio(stages: dict) -> float:
    """Linear-weight bytes after quantization over the same layers' fp32 bytes (all stages)."""
    return sum(s["quantized"] for s in stages.values()) / sum(s["fp32"] for s in stages.values())


def summarise_quant(d: dict) -> dict:
    """Per variant: latency ratios vs fp32 at N=1 and N=512, accuracy vs eager, weight bytes."""
    lat, acc, wb = d["latency"], d["accuracy"], d["weight_bytes"]
    variants = {
        k: {
            "latency_ratio_n1": lat["N=1"][k]["ratio_vs_fp32"],
            "latency_ratio_n512": lat["N=512"][k]["ratio_vs_fp32"],
            # warm: requests in a row per variant (a server running one model); older runs lack it
            "latency_ratio_n1_warm": (lat.get("N=1 warm") or {}).get(k, {}).get("ratio_vs_fp32"),
            "latency_ratio_n512_warm": (lat.get("N=512 warm") or {}).get(k, {}).get("ratio_vs_fp32"),
            "delta_auc": acc[k]["delta_auc"],
            "top10_overlap": acc[k]["top10_overlap_mean"],
            "max_abs": acc[k]["max_abs"],
            "bytes_ratio": _bytes_ratio(wb[k]),
            # intra-op threads of the small-batch stages (exporter/stage_threads); older runs lack it
            "stage_threads": ((d.get("stage_threads") or {}).get(k) or {}).get("chosen"),
        }
        for k in acc
    }
    return {"trained": d["env"]["trained"], "model": d["env"]["model"], "variants": variants}


def summarise_accuracy_level(d: dict) -> dict:
    """Per batch size: each MatMulNBits variant's latency ratio and max |diff| vs fp32."""
    return {
        "batches": {
            str(b): {
                k: {"ratio": v["ratio_vs_fp32"], "max_abs": v["max_abs_vs_fp32"]}
                for k, v in rows.items()
            }
            for b, rows in d["batches"].items()
        }
    }


def summarise_serve(d: dict) -> dict:
    """Per ugsep variant and concurrency: candidates/s and p99 relative to eager (paired by round)."""
    per = {
        variant: {
            str(conc): {
                "candidates_per_s_ratio": r["candidates_per_s_ratio"],
                "p99_ratio": r["p99_ratio"],
            }
            for conc, r in ratios.items()
        }
        for variant, ratios in d["paired_ratios"].items()
    }
    return {
        "student": d["student"],
        "candidates": d["candidates"],
        "flop_ceiling_split": d["flop_ceiling_split"],
        "cache_hit_ratio": d["ugsep_cache_at_end"].get("ugsep_cache_hit_ratio"),
        "vs_eager": per,
        "cpu": d.get("machine", {}).get("cpu"),
    }


def paired(segments: list[dict], variant: str, baseline: str) -> dict[str, dict]:
    """Per concurrency: median over rounds of variant/baseline candidates/s and p99 in the same round."""
    out = {}
    for conc in sorted({s["concurrency"] for s in segments}):
        cps, p99 = [], []
        for rnd in sorted({s["round"] for s in segments}):
            pair = {
                s["variant"]: s for s in segments if s["concurrency"] == conc and s["round"] == rnd
            }
            if variant in pair and baseline in pair and pair[baseline]["candidates_per_s"] > 0:
                cps.append(pair[variant]["candidates_per_s"] / pair[baseline]["candidates_per_s"])
                p99.append(pair[variant]["p99_ms"] / pair[baseline]["p99_ms"])
        if cps:
            out[str(conc)] = {
                "candidates_per_s_ratio": statistics.median(cps),
                "p99_ratio": statistics.median(p99),
            }
    return out


def summarise_moe(d: dict) -> dict:
    """The two headline ratios, and per (E, k): sparse vs dense-masked at N=200, W8A16 vs fp32 at M=1."""
    return {
        "dense_over_sparse_e16_k2_n200": d["dense_over_sparse_e16_k2_n200"],
        "w8_over_fp32_user_m1": d["w8_over_fp32_user_m1"],
        "threads": d["threads"],
        "load_average": {"before": d["loadavg_before"][0], "after": d["loadavg_after"][0]},
        "configs": {
            f"E={c['experts']} k={c['top_k']}": {
                "dense_over_sparse_n200": c["dense_over_sparse_n200"],
                "sparse_form_n200": c["sparse_form_n200"],
                "eager_over_sparse_n200": c["eager_over_sparse_n200"],
                "w8_over_fp32_user_m1": c["w8_over_fp32_user_m1"],
            }
            for c in d["configs"]
        },
    }


def summarise_triton(d: dict) -> dict:
    """Each Triton variant relative to ``ugsep serve`` (paired by round), per concurrency."""
    segments = d["segments"]
    others = sorted({s["variant"] for s in segments} - {"ugsep-serve"})
    return {
        "student": d["student"],
        "candidates": d["candidates"],
        "vs_ugsep_serve": {v: paired(segments, v, "ugsep-serve") for v in others},
    }


BENCHMARKS = (
    Benchmark("split", "bench_split.py", "bench_split.json", _split_args, summarise_split),
    Benchmark("gemv_m1", "gemv_m1.py", "gemv_m1.json", _gemv_args, summarise_gemv_m1),
    Benchmark(
        "quant_accuracy_level",
        "bench_quant_accuracy_level.py",
        "bench_quant_accuracy_level.json",
        _accuracy_level_args,
        summarise_accuracy_level,
    ),
    Benchmark("quant", "bench_quant.py", "bench_quant.json", _quant_args, summarise_quant),
    Benchmark(
        "serve",
        "bench_serve.py",
        "bench_serve.json",
        lambda c: _serve_args(c, "serve"),
        summarise_serve,
    ),
    Benchmark(
        "triton",
        "bench_triton.py",
        "bench_triton.json",
        lambda c: _serve_args(c, "triton"),
        summarise_triton,
    ),
    Benchmark("moe", "bench_moe.py", "bench_moe.json", _moe_args, summarise_moe),
)
BY_NAME = {b.name: b for b in BENCHMARKS}
NO_STUDENT = ("quant_accuracy_level", "moe", "gemv_m1")  # need no distilled RankMixer checkpoint


def collect(out: Path, names: list[str] | None = None) -> dict[str, dict]:
    """Summaries of the result files in ``out``: {name: {"file", "summary"} or {"missing": True}}.

    Raises SummaryError naming the file and key when a file exists but does not parse as expected.
    """
    summary = {}
    for b in BENCHMARKS:
        if names is not None and b.name not in names:
            continue
        path = out / b.result
        if not path.exists():
            summary[b.name] = {"file": b.result, "missing": True}
            continue
        try:
            data = json.loads(path.read_text())
            summary[b.name] = {"file": b.result, "summary": b.summarise(data)}
        except json.JSONDecodeError as e:
            raise SummaryError(f"{path}: not valid JSON ({e})") from e
        except (KeyError, TypeError, ZeroDivisionError, AttributeError) as e:
            raise SummaryError(
                f"{path}: cannot build the {b.name} summary ({type(e).__name__}: {e}); "
                f"did the schema written by benchmarks/{b.script} change? update summarise_{b.name}"
            ) from e
    return summary


# ---------------------------------------------------------------- markdown


def _x(v: float | None, fmt: str = ".2f", suffix: str = "x") -> str:
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def _md_split(s: dict) -> list[str]:
    lines = ["| N | split vs full | FLOP ceiling | fraction of ceiling |", "|---:|---:|---:|---:|"]
    for n, r in s["per_n"].items():
        lines.append(
            f"| {n} | {_x(r['speedup'])} | {_x(r['ceiling'])} | {r['fraction_of_ceiling']:.0%} |"
        )
    load = s["load_average"]
    return lines + [
        "",
        f"ORT CPU, {s['threads']} threads; load average {load['before']:.1f} → {load['after']:.1f}."
        + _cpu_note(s.get("cpu")),
    ]


def _md_gemv_m1(s: dict) -> list[str]:
    rates = s["gemv_gb_per_s"]
    lines = ["| GEMV [1,1024]x[1024,1024] | GB/s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in rates.items()]
    layouts = ", ".join(f"{k.upper()} {_x(v)}" for k, v in s["per_token_batched_over_unrolled"].items())
    lines += ["", f"ONNX Runtime's GEMV at {_x(s['ort_gemv_over_best'])} of the best; per-token FFN "
              f"batched / unrolled: {layouts}."]
    b = s.get("n16")
    if b:
        k = b["user_m1_kernel_ms"]
        lines += ["", f"N=16: stages at {b['fraction_of_ceiling_n16_stages']:.0%} of the FLOP ceiling; "
                  f"with every user weight at the best GEMV rate and no other user node, at most "
                  f"{b['fraction_of_ceiling_n16_best_gemv_bound']:.0%} (user graph at M=1: GEMMs "
                  f"{k['gemm']:.2f} ms, its {k['other_nodes']} other nodes {k['other']:.2f} ms; group "
                  f"graph {b['group_n16_gflops']:.0f} GFLOP/s, {b['group_ms_for_0_8_with_best_gemv_user']:.2f} ms "
                  f"needed for 80 %)."]
    if s.get("group_boundary_free_flop_share") is not None:
        lines += ["", f"Group graph FLOPs that need no user-stage output (could overlap it on another "
                  f"core): {s['group_boundary_free_flop_share']:.1%}."]
    if s.get("roofline"):
        per = "; ".join(f"{t[1:]} thread(s): user weights stream in {r['stream_ms']:.2f} ms "
                        f"({r['stream_gb_per_s']:.0f} GB/s), 80 % beside the measured group stage needs "
                        f"the user stage in {r['user_ms_for_0_8']:.2f} ms, roofline {r['fraction']:.0%}"
                        for t, r in s["roofline"].items())
        lines += ["", "Memory roofline at N=16 (user stage = streaming its weights, group stage at the "
                  f"full graph's FLOP rate): {per}."]
    return lines + ["", f"ORT CPU, {s['threads']} thread(s)." + _cpu_note(s.get("cpu"))]


def _cpu_note(cpu: dict | None) -> str:
    """' CPU: AMD EPYC (avx512, int8 dot product avx512_vnni).' — w8a8 figures depend on it."""
    if not cpu:
        return ""
    return f" CPU: {cpu['name']} ({cpu['simd']}, int8 dot product {cpu['int8_dot'] or 'none'})."


def _threads(chosen: dict | None) -> str:
    """'user 1, group_small 1' for the stages run on fewer threads than served; '-': none."""
    if chosen is None:
        return "-"
    return ", ".join(f"{k} {v}" for k, v in chosen.items()) or "serving threads"


def _md_quant(s: dict) -> list[str]:
    lines = [
        "| variant | latency N=1 | latency N=512 | warm N=1 | warm N=512 | ΔAUC | top-10 overlap "
        "| weight bytes | threads at N=1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k, v in s["variants"].items():
        auc = "-" if v["delta_auc"] is None else f"{v['delta_auc']:+.1e}"
        top = "-" if v["top10_overlap"] is None else f"{v['top10_overlap']:.3f}"
        warm = [v.get("latency_ratio_n1_warm"), v.get("latency_ratio_n512_warm")]
        warm_s = " | ".join("-" if w is None else _x(w) for w in warm)
        lines.append(
            f"| {k} | {_x(v['latency_ratio_n1'])} | {_x(v['latency_ratio_n512'])} | {warm_s} "
            f"| {auc} | {top} | {_x(v['bytes_ratio'])} | {_threads(v.get('stage_threads'))} |"
        )
    return lines + [
        "",
        "Latency relative to the fp32 split bundle (cold: variants interleaved request by request, "
        "so each request finds the others' weights in cache; warm: several requests in a row per "
        "variant, the first dropped: a server running one model); weight bytes: the variant's "
        "linear-layer bytes over the "
        f"same layers in fp32; accuracy vs eager ({s['model']}, trained={s['trained']}); threads "
        "at N=1: the stages the export's threads step moved to fewer intra-op threads than the "
        "2 served with (every variant timed alike).",
    ]


def _md_accuracy_level(s: dict) -> list[str]:
    batches = list(s["batches"])
    variants = list(next(iter(s["batches"].values())))
    lines = ["| variant | " + " | ".join(f"batch {b} vs fp32" for b in batches) + " |"]
    lines.append("|---|" + "---:|" * len(batches))
    for v in variants:
        lines.append(
            f"| {v} | " + " | ".join(_x(s["batches"][b][v]["ratio"]) for b in batches) + " |"
        )
    return lines


def _ratio_table(per_variant: dict, against: str) -> list[str]:
    """Candidates/s and p99 ratios per variant and concurrency, against one baseline."""
    lines = [
        f"| variant | concurrency | candidates/s vs {against} | p99 vs {against} |",
        "|---|---:|---:|---:|",
    ]
    for variant, per in per_variant.items():
        for conc, r in per.items():
            lines.append(
                f"| {variant} | {conc} | {_x(r['candidates_per_s_ratio'])} | {_x(r['p99_ratio'])} |"
            )
    return lines


def _md_serve(s: dict) -> list[str]:
    return _ratio_table(s["vs_eager"], "eager") + [
        "",
        f"{s['student']}, N={s['candidates']}; FLOP ceiling of the split {_x(s['flop_ceiling_split'])}; "
        f"user-cache hit ratio {_x(s['cache_hit_ratio'], '.0%', '')}." + _cpu_note(s.get("cpu")),
    ]


def _md_triton(s: dict) -> list[str]:
    return _ratio_table(s["vs_ugsep_serve"], "ugsep serve") + ["", f"{s['student']}, N={s['candidates']}."]


def _md_moe(s: dict) -> list[str]:
    rows = [
        f"| {cfg} | {_x(r['dense_over_sparse_n200'])} | {r['sparse_form_n200']} "
        f"| {_x(r['eager_over_sparse_n200'], '.0f')} | {_x(r['w8_over_fp32_user_m1'])} |"
        for cfg, r in s["configs"].items()
    ]
    lines = [
        "| E, k | group N=200: dense-masked / sparse | sparse form | eager / sparse "
        "| user M=1: W8A16 / fp32 |",
        "|---|---:|---|---:|---:|",
        *rows,
    ]
    load = s["load_average"]
    return lines + [
        "",
        f"Headline (E=16, k=2): dense-masked / sparse {_x(s['dense_over_sparse_e16_k2_n200'])} "
        f"(goal >= 3x), W8A16 / fp32 at M=1 {_x(s['w8_over_fp32_user_m1'])} (goal <= 0.7x). "
        f"ORT CPU, {s['threads']} threads; load average {load['before']:.1f} → {load['after']:.1f}.",
    ]


_MD = {
    "split": ("UG split vs full graph (bench_split)", _md_split),
    "gemv_m1": ("What an fp32 user graph at batch 1 could cost at best (gemv_m1)", _md_gemv_m1),
    "quant_accuracy_level": (
        "MatMulNBits accuracy_level (bench_quant_accuracy_level)",
        _md_accuracy_level,
    ),
    "quant": ("W8A16 on ORT CPU (bench_quant)", _md_quant),
    "serve": ("ugsep serve vs eager PyTorch (bench_serve)", _md_serve),
    "triton": ("Triton vs ugsep serve (bench_triton)", _md_triton),
    "moe": ("Sparse MoE vs dense-masked, W8A16 experts (bench_moe)", _md_moe),
}


QUICK_NOTE = (
    "**Quick run** (`--quick`): tiny student, a few repeats on a shared machine. A smoke test "
    "of the benchmarks, not figures to quote."
)


def to_markdown(
    summary: dict[str, dict], status: dict[str, str] | None = None, quick: bool = False
) -> str:
    """SUMMARY.md: one table of headline ratios per benchmark; ratios are medians, see each JSON."""
    lines = [
        "# Benchmark summary",
        "",
        "Generated by `benchmarks/run_all.py` from the JSON files beside this one.",
        "",
    ]
    if quick:
        lines += [QUICK_NOTE, ""]
    for name, entry in summary.items():
        title, render = _MD[name]
        lines += [f"## {title}", ""]
        if status and status.get(name, "ok") != "ok":
            lines += [f"**{status[name]}**", ""]
        if entry.get("missing"):
            lines += [f"No `{entry['file']}` here.", ""]
            continue
        lines += [*render(entry["summary"]), "", f"Source: `{entry['file']}`.", ""]
    return "\n".join(lines)


def write_summary(
    out: Path,
    names: list[str] | None = None,
    status: dict[str, str] | None = None,
    quick: bool = False,
) -> dict:
    """Collect, then write summary.json and SUMMARY.md into ``out``."""
    summary = collect(out, names)
    payload = {"quick": quick, "summary": summary, "status": status or {}}
    (out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "SUMMARY.md").write_text(to_markdown(summary, status, quick))
    return summary


# ---------------------------------------------------------------- running


def run_step(label: str, cmd: list[str], log: Path) -> tuple[int, float]:
    """Run one subprocess, echo its output prefixed with ``label`` and keep a copy in ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (
        log.open("w") as f,
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as proc,
    ):
        f.write("$ " + " ".join(cmd) + "\n")
        for line in proc.stdout:
            f.write(line)
            if not any(n in line for n in NOISE):
                print(f"  [{label}] {line.rstrip()}", flush=True)
        rc = proc.wait()
    return rc, time.perf_counter() - t0


def _tail(log: Path, n: int = 15) -> str:
    return "\n".join("      " + ln for ln in log.read_text().splitlines()[-n:])


def train_student(ctx: Context) -> Path | None:
    """Distil the shared RankMixer student once; None (each script falls back to its own) on failure."""
    target = ctx.work / f"student-{ctx.size}"
    ckpt = target / "student"
    if (ckpt / "model.safetensors").exists():
        print(f"== student: reusing {ckpt}", flush=True)
        return ckpt
    cmd = [sys.executable, "-m", "students.train", "--kind", "rankmixer", "--size", ctx.size]
    cmd += ["--out", str(target), "--no-control", "--seed", "0"] + (
        ["--steps", "30"] if ctx.quick else []
    )
    print(f"== student: training rankmixer-{ctx.size} once for all benchmarks", flush=True)
    rc, secs = run_step("student", cmd, ctx.out / "logs" / "student.log")
    if rc != 0 or not (ckpt / "model.safetensors").exists():
        print(
            f"!! student: training failed (exit {rc}); benchmarks use their own defaults",
            flush=True,
        )
        return None
    print(f"== student: done in {secs:.0f}s -> {ckpt}", flush=True)
    return ckpt


def run_benchmarks(ctx: Context, names: list[str]) -> dict[str, str]:
    """Run the named benchmarks in order; returns {name: "ok" | failure message}."""
    status = {}
    chosen = [b for b in BENCHMARKS if b.name in names]
    for i, b in enumerate(chosen, 1):
        cmd = [sys.executable, str(ROOT / "benchmarks" / b.script), *b.args(ctx)]
        log = ctx.out / "logs" / f"{b.name}.log"
        print(f"== [{i}/{len(chosen)}] {b.name}: {' '.join(cmd[1:])}", flush=True)
        rc, secs = run_step(b.name, cmd, log)
        if rc == 0 and (ctx.out / b.result).exists():
            status[b.name] = "ok"
            print(
                f"== [{i}/{len(chosen)}] {b.name}: ok in {secs:.0f}s -> {ctx.out / b.result}",
                flush=True,
            )
        else:
            why = f"exit {rc}" if rc else f"no {b.result} written"
            status[b.name] = f"FAILED ({why}) after {secs:.0f}s; log: {log}"
            print(f"!! [{i}/{len(chosen)}] {b.name}: {status[b.name]}\n{_tail(log)}", flush=True)
    return status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny student, few repeats (a few minutes)"
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(BY_NAME),
        metavar="NAME",
        help=f"subset of {list(BY_NAME)}",
    )
    p.add_argument(
        "--out", type=Path, help=f"result dir (default {RESULTS}; with --quick {QUICK_DIR})"
    )
    p.add_argument(
        "--work",
        type=Path,
        help="scratch dir for students and bundles (default OUT/work or artifacts/)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="a trained RankMixer checkpoint to use instead of training one (bench size; tiny with --quick)",
    )
    p.add_argument(
        "--summary-only", action="store_true", help="run nothing; rebuild the summary from OUT"
    )
    args = p.parse_args(argv)
    args.out = (args.out or (QUICK_DIR if args.quick else RESULTS)).absolute()
    default_work = QUICK_DIR / "work" if args.quick else ROOT / "artifacts" / "bench"
    args.work = (args.work or default_work).absolute()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or list(BY_NAME)
    status: dict[str, str] = {}
    t0 = time.perf_counter()
    if args.summary_only and not args.out.is_dir():
        print(f"!! summary: result dir '{args.out}' does not exist", flush=True)
        return 1
    if not args.summary_only:
        args.out.mkdir(parents=True, exist_ok=True)
        needs_student = any(n not in NO_STUDENT for n in names)
        ckpt = args.checkpoint or (
            train_student(Context(args.quick, args.out, args.work, None)) if needs_student else None
        )
        status = run_benchmarks(Context(args.quick, args.out, args.work, ckpt), names)
    try:
        write_summary(args.out, status=status, quick=args.quick)
    except SummaryError as e:
        print(f"!! summary: {e}", flush=True)
        return 1
    print(
        f"== summary: {args.out / 'SUMMARY.md'} ({time.perf_counter() - t0:.0f}s in all)",
        flush=True,
    )
    failed = [n for n, s in status.items() if s != "ok"]
    if failed:
        print(f"!! failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
