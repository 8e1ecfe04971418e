"""TensorRT for bundles: the CPU readiness lint, engine builds, and their CLI/pipeline hooks.

    ugsep check --trt-lint BUNDLE          lint_bundle(BUNDLE): every stage graph vs TensorRT's
                                           documented ONNX support; exit 1 on errors
    ugsep build-trt BUNDLE [--m 1,8,256]   build_engines(BUNDLE): engines for the GPU here, into
                                           engines/<gpu>-trt<version>/, recorded in the manifest
    ugsep build-trt BUNDLE --plan          engine_plan(BUNDLE): the optimization profiles of every
                                           stage input (no TensorRT, no GPU needed)
    ugsep export ... --target trt          pipeline steps ``step_trt_lint`` (before writing:
                                           refuse graphs TensorRT would reject) and
                                           ``step_trt_build`` (after writing, before parity)

``add_arguments(parser)`` / ``run(args)`` are the ``build-trt`` subcommand (exporter.cli
delegates to them). Nothing here imports ``tensorrt`` until an engine is built.

A bundle with an embedding store (docs/embedding-store.md): the store stays outside the
engines. Its stages take the looked-up vectors (``emb<k>__<input>``, float32) as inputs
like any other; the profiles give each the batch range of its side in that stage (user
lookups M rows in user.plan, N rows in full.plan; candidate lookups N rows), and the
runtime's ``StoreFeeds`` feeds them to the engines as it feeds ONNX Runtime. The plan and
the manifest's engine entry list those inputs (``store_inputs``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.args import StepOptions, arg
from exporter.errors import ExportError
from runtime.manifest import Engine

if TYPE_CHECKING:
    from exporter.pipeline import ExportContext

log = logging.getLogger(__name__)

DEFAULT_OPT_M, DEFAULT_OPT_N = 8, 512


# ---- readiness lint ----------------------------------------------------------------------


def lint_models(models: dict[str, Any]) -> dict[str, list]:
    """{stage: findings} for in-memory ONNX models (``onnx.ModelProto`` or ``onnx_ir.Model``)."""
    from graph_passes.onnx.trt_support import check_trt_readiness

    return {stage: check_trt_readiness(model) for stage, model in models.items()}


def lint_stages(bundle_dir: str | Path) -> dict[str, list]:
    """{stage: findings} for every ONNX graph of the bundle at ``bundle_dir``."""
    import onnx

    from runtime.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    return lint_models({s: onnx.load(str(bundle.stage_path(s))) for s in bundle.manifest.stages})


def lint_report(results: dict[str, list]) -> tuple[str, bool]:
    """(report text, ok): one section per stage; ok is False when any stage has errors."""
    from graph_passes.onnx.trt_support import format_report, has_errors

    text = "\n".join(format_report(f, title=f"{stage}.onnx") for stage, f in results.items())
    return text, not any(has_errors(f) for f in results.values())


def lint_bundle(bundle_dir: str | Path) -> int:
    """``ugsep check --trt-lint``: print the readiness report; 0 when ready, 1 on errors."""
    from exporter.progress import console

    text, ok = lint_report(lint_stages(bundle_dir))
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    return 0 if ok else 1


# ---- engine builds -----------------------------------------------------------------------


def build_engines(
    bundle_dir: str | Path,
    *,
    m: str | None = None,
    n: str | None = None,
    fp16: bool = True,
    workspace_gb: float | None = None,
    cache_dir: str | Path | None = None,
    stages: list[str] | None = None,
    lint: bool = True,
) -> dict[str, Any]:
    """Build engines for this GPU into ``bundle_dir`` and record them; returns the manifest entry.

    ``m``/``n``: 'min,opt,max' batch ranges for users per call / candidates per call (default
    1,8,limits.max_users_per_call and 1,512,limits.max_candidates). Quantized bundles build a
    strongly typed network; fp32 bundles build with fp16 kernels allowed unless ``fp16=False``.
    """
    from exporter.progress import console
    from exporter.steps.trt_engine import BuildOptions, EngineFromOnnx
    from exporter.steps.write import update_bundle
    from runtime.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    manifest = bundle.manifest
    stages = _stages(manifest, stages)
    ranges = batch_ranges(manifest, m, n)
    plan = {stage: stage_profiles(bundle.stage_path(stage), stage, manifest, *ranges) for stage in stages}
    if lint:
        text, ok = lint_report(lint_stages(bundle.root))
        if not ok:
            raise ExportError(f"the bundle's graphs are not ready for TensorRT:\n{text}")
    trt_version, gpu, rel_dir = _build_target()
    log_path = bundle.root / rel_dir / "build.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    quantized = manifest.precision in ("w8a16", "w4a16")
    files: dict[str, Any] = {}
    for stage in stages:
        path = bundle.stage_path(stage)
        options = BuildOptions(
            fp16=fp16,
            strongly_typed=quantized,
            workspace_bytes=int(workspace_gb * (1 << 30)) if workspace_gb else None,
            timing_cache=timing_cache_path(cache_dir, rel_dir),
            log_path=log_path,
            profiles=plan[stage],
        )
        with console.status(f"building the TensorRT engine for {stage} ({gpu['gpu']}) …"):
            files[f"{rel_dir}/{stage}.plan"] = EngineFromOnnx(path, options)()
    files[f"{rel_dir}/build.log"] = log_path.read_text()
    precision = "strongly-typed" if quantized else ("fp16" if fp16 else "fp32")
    entry = _engine_entry(rel_dir, gpu, trt_version, stages, sorted(files), precision, ranges)
    store = store_inputs(manifest, plan)
    if store:  # the tables stay in the bundle's store; these engine inputs are looked-up rows
        entry.store_inputs = store
    engines = [e for e in manifest.engines if e.dir != rel_dir] + [entry]
    update_bundle(bundle.root, files, engines=engines)
    return entry


def _stages(manifest, stages: list[str] | None) -> list[str]:
    stages = stages or (["user", "group"] if manifest.is_split else ["full"])
    missing = [s for s in stages if s not in manifest.stages]
    if missing:
        raise ExportError(f"the bundle has no stage(s) {missing} (it has: {', '.join(manifest.stages)})")
    return stages


def store_inputs(manifest, plan: dict[str, dict]) -> dict[str, list[str]]:
    """{stage: [engine inputs that are looked-up store rows]} (empty without a store)."""
    lookups = {lk.stage_input for lk in (manifest.embeddings.lookups if manifest.embeddings else [])}
    return {stage: sorted(lookups & set(inputs)) for stage, inputs in plan.items() if lookups & set(inputs)}


def engine_plan(bundle_dir: str | Path, *, m: str | None = None, n: str | None = None,
                stages: list[str] | None = None) -> dict[str, Any]:
    """``ugsep build-trt --plan``: what ``build_engines`` would give TensorRT, without it.

    {"M": [min, opt, max], "N": [...], "stages": {stage: {input: {"batch": "M"|"N",
    "min"/"opt"/"max": shape, "store_table": table or None}}}, "store": file or None}.
    """
    from runtime.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    manifest = bundle.manifest
    ranges = batch_ranges(manifest, m, n)
    tables = {lk.stage_input: lk.table for lk in (manifest.embeddings.lookups if manifest.embeddings else [])}
    out: dict[str, Any] = {}
    for stage in _stages(manifest, stages):
        profiles = stage_profiles(bundle.stage_path(stage), stage, manifest, *ranges)
        out[stage] = {
            name: {"batch": "M" if _on_m(stage, name, manifest) else "N", "min": list(lo), "opt": list(opt),
                   "max": list(hi), "store_table": tables.get(name)}
            for name, (lo, opt, hi) in profiles.items()
        }
    return {"M": list(vars(ranges[0]).values()), "N": list(vars(ranges[1]).values()), "stages": out,
            "store": manifest.embeddings.file if manifest.embeddings else None}


def _on_m(stage: str, name: str, manifest) -> bool:
    return stage == "user" or (stage == "group" and name in m_rows_inputs(manifest))


def m_rows_inputs(manifest) -> set[str]:
    """The group graph's inputs with M rows (one per user): the boundary tensors."""
    return {b.name for b in manifest.split.boundary} if manifest.split else set()


def _build_target() -> tuple[str, dict, str]:
    """(TensorRT version, this GPU, the bundle-relative engine dir) or ExportError saying why not."""
    from runtime.backends.tensorrt import engine_dir_name, gpu_info, import_tensorrt
    from runtime.errors import BackendUnavailableError

    try:
        trt, gpu = import_tensorrt(), gpu_info()
    except BackendUnavailableError as e:
        raise ExportError(f"cannot build TensorRT engines here: {e}") from e
    return trt.__version__, gpu, engine_dir_name(gpu["gpu"], trt.__version__)


def _engine_entry(rel_dir, gpu, trt_version, stages, files, precision, ranges) -> Engine:
    """The manifest ``engines`` entry (runtime.manifest.Engine)."""
    return Engine(
        dir=rel_dir,
        gpu=gpu["gpu"],
        compute_capability=gpu["compute_capability"],
        trt_version=trt_version,
        stages=stages,
        files=files,
        precision=precision,
        profiles={"M": list(vars(ranges[0]).values()), "N": list(vars(ranges[1]).values())},
        built=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    )


def batch_ranges(manifest, m: str | None, n: str | None):
    """(M range, N range) from flags or the manifest's limits."""
    from exporter.steps.trt_engine import BatchRange

    max_m, max_n = manifest.limits.max_users_per_call, manifest.limits.max_candidates
    m_range = BatchRange.parse(m) if m else BatchRange(1, min(DEFAULT_OPT_M, max_m), max_m)
    n_range = BatchRange.parse(n) if n else BatchRange(1, min(DEFAULT_OPT_N, max_n), max_n)
    return m_range, n_range


def stage_profiles(path: Path, stage: str, manifest, m_range, n_range) -> dict:
    """Optimization-profile shapes for every input of one stage graph.

    user.onnx: every input has M rows; group.onnx: the boundary tensors have M rows, the
    candidate inputs and ``user_index`` N rows; full.onnx: N rows.
    """
    import onnx

    from exporter.steps.trt_engine import input_profiles

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {}
    for i in graph.input:
        dims = i.type.tensor_type.shape.dim[1:]
        if any(not d.HasField("dim_value") for d in dims):
            raise ExportError(f"{path.name}: input '{i.name}' has a dynamic non-batch dim")
        inputs[i.name] = tuple(d.dim_value for d in dims)
    if stage == "user":
        m_inputs = set(inputs)
    elif stage == "group":
        m_inputs = m_rows_inputs(manifest)
    else:
        m_inputs = set()
    return input_profiles(inputs, m_inputs, m_range, n_range)


def timing_cache_path(cache_dir: str | Path | None, rel_dir: str) -> Path:
    """The persistent timing cache for one GPU + TensorRT version (shared by all builds)."""
    root = Path(cache_dir or os.environ.get("UGSEP_CACHE_DIR") or Path.home() / ".cache" / "ugsep")
    return root / "tensorrt" / f"{Path(rel_dir).name}.timing-cache"


# ---- pipeline steps (exporter.pipeline, --target trt) ------------------------------------


@dataclass
class TensorRTOptions(StepOptions):
    """Steps ``trt-lint`` / ``trt-build`` (``--target trt``): the engines built at export."""

    m: str | None = arg("--trt-m", default=None, metavar="MIN,OPT,MAX", help="--target trt: users per call of the engines' profile (default 1,8,limits.max_users_per_call)")
    n: str | None = arg("--trt-n", default=None, metavar="MIN,OPT,MAX", help="--target trt: candidates per call of the engines' profile (default 1,512,limits.max_candidates)")
    require_gpu: bool = arg("--trt-require-gpu", default=False, action="store_true", help="--target trt: fail when the engines cannot be built here (default: write the linted bundle and build engines later with ugsep build-trt)")


def step_trt_lint(ctx: ExportContext) -> None:
    """Before writing: refuse a TRT export whose graphs TensorRT would reject (no-op for onnx)."""
    if ctx.options.target != "trt":
        return
    text, ok = lint_report(lint_models(ctx.stages))
    if not ok:
        raise ExportError(f"--target trt: the exported graphs are not ready for TensorRT:\n{text}")
    log.info("TensorRT readiness: %d graph(s) ready", len(ctx.stages))
    opt = ctx.manifest_fields.get("optimize")
    for stage, rec in ((opt.moe_form if opt else None) or {}).items():  # moe_form.trt_form: TRT's form
        log.info("TensorRT: %s.onnx runs its %d MoE bank(s) in the %s form (%s)", stage,
                 len(rec.banks), rec.form, rec.chosen_by)


def step_trt_build(ctx: ExportContext) -> None:
    """After writing: build engines for this GPU into the bundle (no-op for --target onnx)."""
    if ctx.options.target != "trt":
        return
    o = ctx.options.tensorrt
    if not o.require_gpu:
        try:
            _build_target()
        except ExportError as e:  # a CPU build box: the graphs are linted, engines come later
            from exporter.progress import console

            console.print(
                f"[yellow]TensorRT engines not built[/yellow]: {e}\n"
                f"  the bundle's graphs passed the TensorRT readiness check; run "
                f"`ugsep build-trt {ctx.out_dir}` on the serving GPU to add engines"
            )
            return
    build_engines(ctx.out_dir, m=o.m, n=o.n, lint=False)


# ---- CLI: ugsep build-trt ----------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``ugsep build-trt``."""
    p.add_argument("bundle", help="bundle directory to add engines to (on the serving GPU)")
    p.add_argument("--m", help="users per call min,opt,max (default 1,8,limits.max_users_per_call)")
    p.add_argument(
        "--n", help="candidates per call min,opt,max (default 1,512,limits.max_candidates)"
    )
    p.add_argument("--fp32", action="store_true", help="no fp16 kernels for fp32 bundles")
    p.add_argument("--workspace-gb", type=float, help="builder workspace limit (GiB)")
    p.add_argument(
        "--cache-dir", help="timing cache dir (default $UGSEP_CACHE_DIR or ~/.cache/ugsep)"
    )
    p.add_argument(
        "--stages",
        nargs="+",
        choices=["full", "user", "group"],
        help="stages to build (default: user+group when split, else full)",
    )
    p.add_argument("--skip-lint", action="store_true", help="skip the TensorRT readiness check")
    p.add_argument("--plan", action="store_true",
                   help="print the optimization profile of every stage input and exit (no TensorRT needed)")


def run(args: argparse.Namespace) -> int:
    """``ugsep build-trt``: build, print the manifest entry."""
    from exporter.progress import console

    if args.plan:
        console.print_json(json.dumps(engine_plan(args.bundle, m=args.m, n=args.n, stages=args.stages)))
        return 0
    entry = build_engines(
        args.bundle,
        m=args.m,
        n=args.n,
        fp16=not args.fp32,
        workspace_gb=args.workspace_gb,
        cache_dir=args.cache_dir,
        stages=args.stages,
        lint=not args.skip_lint,
    )
    console.print_json(json.dumps(entry))
    return 0
