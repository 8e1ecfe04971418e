"""Weight-only quantization of a bundle's ONNX stages, guided by measured sensitivity.

    quantized, record = quantize_bundle_stages(
        {"full": full, "user": user, "group": group}, spec,
        precision="w8a16", target="ort-cpu",
        calibration=Calibration(rows, reference, labels, request_ids),
    )

Procedure (per serving path: user+group together when split, full on its own):

 1. canonicalise every stage once (graph_passes.onnx.canonicalize_linear);
 2. quantize everything, run the stages with ONNX Runtime on the held-out rows and
    compare with the EAGER fp32 outputs (``calibration.reference``) under the budget
    (the parity budgets for the precision: |ΔAUC|, top-10 overlap, max abs error);
 3. measure each layer group alone (a 2-D weight, or all tokens of one per-token weight),
    quantized with everything else in float: its effect is the table in the manifest;
 4. if step 2 missed the budget, keep in float the most damaging groups (ranked by the
    share of the budget each uses alone, ``budget_damage``), one more at a time, until the
    budget is met: the fewest layers in float this ranking allows.

The record (``manifest.quantization``) holds the scheme, the budget, the outcome of the
all-layers and the selected configurations, the per-layer table and weight bytes per stage.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from exporter.errors import ExportError
from exporter.steps import quant_noise
from exporter.steps.parity.budgets import DEFAULTS, evaluate
from exporter.steps.parity.check import output_metrics
from exporter.steps.parity.metrics import request_groups
from graph_passes.onnx import canonicalize_linear, linear_layers, linear_weight_bytes, quantize_onnx
from graph_passes.onnx.pipelines import NBITS_MIN_ELEMENTS, describe
from graph_passes.onnx.quantize import MIN_K
from runtime.manifest import SMALL_GROUP as SMALL
from runtime.manifest import Quantization

log = logging.getLogger(__name__)
PRECISIONS = {"w8a16": 8, "w4a16": 4}
TARGETS = ("ort-cpu", "gpu", "qdq")
_ALL_STAGES = ("full", "user", "group")
# Per target, the speed choices QuantizeOptions defaults to (measured: benchmarks/bench_quant.py).
TARGET_DEFAULTS: dict[str, dict[str, Any]] = {
    "ort-cpu": {"min_elements": NBITS_MIN_ELEMENTS, "per_token_stages": ("user",)},
    "gpu": {"min_elements": 0, "per_token_stages": _ALL_STAGES},
    "qdq": {"min_elements": 0, "per_token_stages": _ALL_STAGES},
}
Rows = dict[str, np.ndarray]


@dataclass
class Calibration:
    """Held-out rows and what the eager fp32 model answered on them.

    rows: feeds keyed by spec input name ([R, ...] each); reference: eager fp32 outputs keyed
    by spec output name; labels (0/1, [R]) enable the AUC budget; request_ids ([R]) group
    rows into requests for the top-k budget (default: one request per distinct user).
    ``request_scoped``: the model mixes the rows of a call (``manifest.row_scope``): the
    reference and every measurement run one request per call.
    """

    rows: Rows
    reference: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    request_ids: np.ndarray | None = None
    request_scoped: bool = False
    heldout_rows: int | None = None  # rows the parity verdict will judge (selection margin)


@dataclass
class QuantizeOptions:
    """How to quantize. ``block_size`` None = int8 per output channel (w4a16 defaults to 32);
    ``accuracy_level`` is MatMulNBits' (ORT CPU only; 4 = int8 activations inside the kernel,
    the fast path); ``budget`` overrides the parity budget of the precision; ``stages``
    limits quantization to some stages (e.g. ``("user", "full")``: on ORT CPU the weight-only
    kernel pays at the user side's batch 1 but loses to fp32 GEMM at a group batch of 512,
    see benchmarks/bench_quant_accuracy_level.py); stages left out keep fp32 weights.
    ``min_elements``: weights (per-token: per token) smaller than this stay fp32 for speed
    (not unrolled, not quantized). ``per_token_stages``: stages whose per-token weights
    ``W[T, D, H]`` are unrolled and quantized; elsewhere they stay one fp32 batched MatMul.

    ``tune`` (default: on for ort-cpu unless either knob is given): choose both per stage by
    timing each stage graph on this CPU (``tune_for_speed``, exporter/steps/quant_tune.py): what
    pays depends on the CPU (a per-token [128, 512] weight at batch 1 ran 0.55x fp32 on one
    x86-64 machine and 0.94x on a Zen 3 without VNNI). ``tune_threads``: intra-op threads
    timed (None: ONNX Runtime's default, as the runtime uses). With ``tune`` off the knobs
    default by target (``TARGET_DEFAULTS``): on ort-cpu ``NBITS_MIN_ELEMENTS`` and per-token
    weights only on the user side (measured on the first machine; benchmarks/bench_quant.py);
    on gpu / qdq every layer is a candidate (TensorRT fuses DequantizeLinear into the GEMM).
    ``min_elements=0`` and all three ``per_token_stages`` quantize every eligible layer:
    smallest bundle, slower on ORT CPU. When fixed knobs leave nothing to quantize (a tiny
    model), export stops and says so.

    ``small_batch`` (tuning only): None = the group stage is also tuned at batch 1 and, when
    a different configuration wins there, the bundle gets a ``group_small`` stage serving
    group calls up to the measured crossover (``quant_tune.crossover``); 0 = never; K > 0 =
    always, serving calls of up to K candidates with the configuration fastest at batch 1.
    The tuner sets ``group_small_rows`` (0: no such stage)."""

    precision: str = "w8a16"
    target: str = "ort-cpu"
    block_size: int | None = None
    accuracy_level: int = 4
    budget: dict[str, float] | None = None
    select: bool = True
    stages: tuple[str, ...] = ("full", "user", "group")
    min_elements: int | None = None
    per_token_stages: tuple[str, ...] | None = None
    tune: bool | None = None
    tune_threads: int | None = None
    stage_min_elements: dict[str, int] | None = None  # per stage, set by speed tuning
    small_batch: int | None = None
    group_small_rows: int = 0  # set by speed tuning: group_small serves calls up to this N

    def __post_init__(self) -> None:
        if self.tune is None:  # explicit speed knobs are the user's choice: no tuning
            explicit = self.min_elements is not None or self.per_token_stages is not None
            self.tune = self.target == "ort-cpu" and not explicit
        if self.target in TARGET_DEFAULTS:
            defaults = TARGET_DEFAULTS[self.target]
            if self.min_elements is None:
                self.min_elements = defaults["min_elements"]
            if self.per_token_stages is None:
                self.per_token_stages = defaults["per_token_stages"]
        if self.precision not in PRECISIONS:
            raise ExportError(
                f"precision '{self.precision}' is not quantized; use one of {list(PRECISIONS)}"
            )
        if self.target not in TARGETS:
            raise ExportError(f"quantization target '{self.target}' is not one of {list(TARGETS)}")
        if self.precision == "w4a16" and self.block_size is None:
            self.block_size = 32
        if self.small_batch is not None and (
            isinstance(self.small_batch, bool) or int(self.small_batch) < 0
        ):
            raise ExportError(
                f"small_batch must be None (timed), 0 (off) or a candidate count > 0, "
                f"got {self.small_batch!r}"
            )

    @property
    def bits(self) -> int:
        return PRECISIONS[self.precision]

    def min_elements_for(self, stage: str) -> int:
        if self.stage_min_elements and stage in self.stage_min_elements:
            return self.stage_min_elements[stage]
        return int(self.min_elements or 0)

    def limits(self) -> dict[str, float]:
        return {**DEFAULTS[self.precision], **(self.budget or {})}

    def scheme(self) -> dict[str, Any]:
        lowering = {
            "ort-cpu": f"com.microsoft.MatMulNBits(bits={self.bits}, accuracy_level={self.accuracy_level})",
            "gpu": "DequantizeLinear(fp16 scale) -> MatMul on fp16 activations",
            "qdq": "DequantizeLinear -> MatMul",
        }[self.target]
        grain = (
            "per-output-channel" if self.block_size is None else f"block-{self.block_size} along K"
        )
        return {
            "stages": list(self.stages),
            "bits": self.bits,
            "symmetric": True,
            "granularity": grain,
            "target": self.target,
            "lowering": lowering,
            "min_elements": dict(self.stage_min_elements)
            if self.stage_min_elements
            else self.min_elements,
            "per_token_stages": list(self.per_token_stages),
        }


def group_of(weight: str) -> str:
    """The layer group of a weight: per-token pieces ``w.t3`` belong to ``w``, and so do a
    grouped-form MoE bank's per-expert pieces ``w.t3.e5`` (one group per bank weight)."""
    return re.sub(r"\.t\d+(\.e\d+)?$", "", weight)


@dataclass
class _Path:
    """One serving path (``("user", "group")`` or ``("full",)``) over canonical stage graphs."""

    stages: tuple[str, ...]
    canonical: dict[str, onnx.ModelProto]
    quantized_stages: tuple[str, ...] = ("full", "user", "group")
    min_elements: dict[str, int] = field(default_factory=dict)  # per stage; missing = 0
    # (stage, weight, why) left fp32 for speed: below min_elements, or per-token off
    small: list[tuple[str, str, str]] = field(default_factory=list)
    groups: dict[str, list[tuple[str, str]]] = field(
        default_factory=dict
    )  # group -> [(stage, weight)]

    def __post_init__(self) -> None:
        for stage in self.stages:
            if stage not in self.quantized_stages:
                continue
            model = ir.serde.deserialize_model(self.canonical[stage])
            m = self.min_elements.get(stage, 0)
            for w in linear_layers(model, min_elements=m):
                self.groups.setdefault(f"{stage}:{group_of(w)}", []).append((stage, w))
            self.small += [(stage, w, why) for w, why in _small_weights(model, m)]

    def build(
        self,
        opts: QuantizeOptions,
        keep_float: Iterable[str] = (),
        only: Iterable[str] | None = None,
    ):
        """Quantized stage protos with the groups in ``keep_float`` (or outside ``only``) in float.

        Selection measures these (kept-float per-token weights unrolled, same numbers);
        the bundle gets ``final_build``."""
        keep, sel = set(keep_float), None if only is None else set(only)
        out, refusals = {}, []
        for stage in self.stages:
            names = [
                w
                for g, ws in self.groups.items()
                for s, w in ws
                if s == stage and (sel is None or g in sel) and g not in keep
            ]
            if not names:  # nothing to quantize here: the canonical fp32 graph, as is
                out[stage] = self.canonical[stage]
                continue
            res = _quantize_canonical(
                self.canonical[stage], opts, names, self.min_elements.get(stage, 0)
            )
            out[stage] = ir.serde.serialize_model(res.model)
            refusals += [f"{stage}: {line}" for line in describe(res.refusals)]
        return out, refusals

    def final_build(self, opts: QuantizeOptions, stages: dict[str, onnx.ModelProto], keep):
        """``build`` for the bundle: per-token weights kept in float are not unrolled (the
        batched MatMul runs faster in fp32 than T MatMuls with a Split and a Concat)."""
        skip = {s: _kept_weights(self, set(keep), s) for s in self.stages}
        final = copy.copy(self)
        final.canonical = dict(self.canonical)
        for s in self.stages:
            if not any(g not in keep for g, ws in self.groups.items() for st, _ in ws if st == s):
                final.canonical[s] = stages[s]  # nothing quantized: the stage as exported
            elif skip[s]:
                final.canonical[s] = _canonical(
                    s, stages[s], self.min_elements.get(s, 0), skip[s], s in opts.per_token_stages
                )
        return final.build(opts, keep_float=keep)


def _small_weights(model: ir.Model, min_elements: int) -> list[tuple[str, str]]:
    """(weight, why) of constant MatMul weights left in fp32 for speed: a reduction dim
    below ``MIN_K``, below ``min_elements``, or per-token weights this stage keeps batched."""
    from graph_passes.onnx._util import const_array

    out: list[tuple[str, int]] = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain != "":
            continue
        w = const_array(node.inputs[1])
        if w is None or w.ndim not in (2, 3) or w.dtype != np.float32:
            continue
        n = int(w[0].size if w.ndim == 3 else w.size)
        if any(node.inputs[1].name == name for name, _ in out):
            continue
        k = int(w.shape[-2])
        if k < MIN_K:  # the pass's own rule (graph_passes.onnx.quantize.weight_refusal)
            why = f"K={k} < min_k={MIN_K}: MatMulNBits pads K to {MIN_K}, int8 saves nothing"
            out.append((node.inputs[1].name or "", why))
        elif n < min_elements:
            why = f"{n} elements < min_elements={min_elements}, this stage's speed choice "
            why += "(smaller weights ran faster as fp32 GEMM; manifest quantization.speed_tuning)"
            out.append((node.inputs[1].name or "", why))
        elif w.ndim == 3:
            why = "per-token weight in a stage outside per_token_stages: one fp32 batched "
            why += "MatMul beats T MatMulNBits at large batch (QuantizeOptions.per_token_stages)"
            out.append((node.inputs[1].name or "", why))
    return out


def _quantize_canonical(
    canon: onnx.ModelProto, opts: QuantizeOptions, names: list[str], min_elements: int
):
    """``quantize_onnx`` of an already canonical stage: the named weights, as ``opts`` says."""
    return quantize_onnx(
        canon,
        bits=opts.bits,
        block_size=opts.block_size,
        target=opts.target,
        only=names,
        accuracy_level=opts.accuracy_level,
        canonicalize=False,
        min_elements=min_elements,
    )


def _kept_weights(path: _Path, keep: set[str], stage: str) -> set[str]:
    """Base weight names (``w`` of ``w.t3``) of the groups of ``stage`` kept in float."""
    return {group_of(w) for g in keep for s, w in path.groups.get(g, []) if s == stage}


class _Runner:
    """Runs a path's stage protos with ONNX Runtime on the calibration rows."""

    def __init__(
        self, calib: Calibration, spec: Any, fixed: Iterable[onnx.ModelProto] = ()
    ) -> None:
        self.calib, self.spec = calib, spec
        # outputs of unmodified (canonical fp32) user graphs are computed once
        self._fixed = {id(p) for p in fixed}
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self.groups = request_groups(
            calib.request_ids if calib.request_ids is not None else self._user_index()
        )

    def _user_index(self) -> np.ndarray:
        from exporter.steps.parity.stages import user_rows

        return user_rows(self.spec, self.calib.rows)[1]

    def run(self, protos: dict[str, onnx.ModelProto]) -> dict[str, np.ndarray]:
        if self.calib.request_scoped:  # one request per call, as the runtime serves it
            from exporter.steps.parity.configs import run_in_chunks

            rows = self.calib.rows
            return run_in_chunks(lambda part: self._run_rows(protos, part), rows, self.groups)
        return self._run_rows(protos, self.calib.rows, cache=True)

    def _run_rows(self, protos, rows: Rows, cache: bool = False) -> dict[str, np.ndarray]:
        if "full" in protos:
            return self._session_run(protos["full"], dict(rows))
        from exporter.steps.parity.stages import user_rows

        users, user_index = user_rows(self.spec, rows)
        key = id(protos["user"])
        boundary = (cache and self._cache.get(key)) or self._session_run(protos["user"], users)
        if cache and key in self._fixed:
            self._cache[key] = boundary
        feeds = {**rows, **boundary, "user_index": user_index}
        return self._session_run(protos[SMALL if SMALL in protos else "group"], feeds)

    def fix(self, proto: onnx.ModelProto) -> None:
        """``proto`` (a user graph) will not change: compute its outputs once."""
        self._fixed.add(id(proto))

    @staticmethod
    def _session_run(proto: onnx.ModelProto, feeds: Rows) -> dict[str, np.ndarray]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.log_severity_level = 3
        sess = ort.InferenceSession(
            proto.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        names = [i.name for i in sess.get_inputs()]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise ExportError(f"calibration rows lack graph input(s) {missing}")
        outs = sess.run(None, {n: feeds[n] for n in names})
        return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}

    def measure(
        self, protos: dict[str, onnx.ModelProto], limits: dict[str, float]
    ) -> dict[str, Any]:
        """Metrics of every output vs the eager reference, the breaches, and ``passed``."""
        got = self.run(protos)
        outputs, breaches = {}, []
        for name, ref in self.calib.reference.items():
            m = output_metrics(
                np.asarray(ref), got[name].reshape(np.shape(ref)), self.calib.labels, self.groups
            )
            n_rows = len(np.asarray(ref))
            quant_noise.add_margin(m, n_rows, self.calib.heldout_rows)
            outputs[name] = {**_summary(m), **quant_noise.summary_fields(m, limits)}
            breaches += [f"{name}: {b}" for b in evaluate(m, limits)[0]]
        return {"passed": not breaches, "breaches": breaches, "outputs": outputs}


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_abs", "mean_abs", "abs_delta_auc", "delta_auc", "auc_ref")
    out = {k: m[k] for k in keys if m.get(k) is not None}
    for k in ("top10_overlap", "kendall_tau"):
        if isinstance(m.get(k), dict):
            out[f"{k}_mean"] = m[k]["mean"]
    return out


def budget_damage(measured: dict[str, Any], limits: dict[str, float]) -> tuple[float, float]:
    """(share of the budget used at its tightest metric, mean abs error) of a measurement.

    1.0 = exactly at a limit. "max" metrics use value / limit; "min" metrics in [0, 1]
    (top-10 overlap) use (1 - value) / (1 - limit). Ranking layers by this, rather than by
    raw error, keeps in float the layers that hurt what the budget checks: on the bench
    RankMixer a user-side layer shifts every candidate alike (large abs error, top-10
    unchanged) while a group-side head layer reorders candidates (small error, top-10 0.72).
    """
    from exporter.steps.parity.budgets import LIMITS

    worst = 0.0
    for out in measured["outputs"].values():
        for key, limit in limits.items():
            value = out.get(key)
            if key == "abs_delta_auc" and out.get("delta_auc_se") is not None:
                continue  # judged by what its interval resolves (quant_noise.damage_uses)
            if key not in LIMITS or not isinstance(value, int | float) or value != value:
                continue
            if LIMITS[key][1] == "max":
                use = value / limit if limit > 0 else (float("inf") if value > 0 else 0.0)
            else:
                use = (1 - value) / (1 - limit) if limit < 1 else float(value < 1) * 1e9
            worst = max(worst, use)
        worst = max([worst, *quant_noise.damage_uses(out, limits)])
    mean_abs = max((o.get("mean_abs", 0.0) for o in measured["outputs"].values()), default=0.0)
    return worst, mean_abs


def quantize_bundle_stages(
    stages: dict[str, onnx.ModelProto],
    spec: Any,
    *,
    options: QuantizeOptions | None = None,
    calibration: Calibration | None = None,
) -> tuple[dict[str, onnx.ModelProto], dict[str, Any]]:
    """Quantize a bundle's stages; returns (stage -> quantized proto, manifest ``quantization``).

    ``stages`` holds "full" and, when split, "user" and "group" (fp32 ONNX, as exported).
    Without ``calibration`` every quantizable layer is quantized and nothing is measured;
    with it, layers are selected against the budget as described in the module docstring.
    """
    opts = options or QuantizeOptions()
    tuning = None
    if opts.tune:
        opts, tuning = tune_for_speed(stages, opts)
    stages = {k: v for k, v in stages.items() if k != SMALL}
    if opts.group_small_rows and {"user", "group"} <= set(stages):
        stages[SMALL] = stages["group"]  # quantized its own way (opts.*_for(SMALL))
    canonical = {
        k: _canonical(k, v, opts.min_elements_for(k), unroll=k in opts.per_token_stages)
        for k, v in stages.items()
    }
    split = {"user", "group"} <= set(stages)
    per_stage = {k: opts.min_elements_for(k) for k in stages}
    quantized = tuple(s for s in opts.stages if s != SMALL)
    paths = [_Path(("user", "group"), canonical, quantized, per_stage)] if split else []
    paths.append(_Path(("full",), canonical, quantized, per_stage))
    if not any(p.groups for p in paths):
        small = sorted({w for p in paths for _, w, _ in p.small})
        raise ExportError(
            f"{opts.precision}: no linear layer is worth quantizing for target '{opts.target}' "
            f"({len(small)} layer(s) below min_elements={opts.min_elements} or per-token in a "
            f"stage outside per_token_stages={list(opts.per_token_stages)}: the measured speed "
            "choice keeps them fp32). Export fp32, or quantize them anyway with "
            "--quant-min-elements 0 --quant-per-token-stages full user group "
            "(smaller bundle; slower on ORT CPU)"
        )
    runner = _Runner(calibration, spec, canonical.values()) if calibration is not None else None
    record: dict[str, Any] = {
        "precision": opts.precision,
        "scheme": opts.scheme(),
        "passes": _PASSES[opts.target],
    }
    record["budget"] = opts.limits() if runner else None
    if tuning is not None:
        record["speed_tuning"] = tuning
    out: dict[str, onnx.ModelProto] = {}
    layers, refusals = [], []

    def run_path(path: _Path, originals, prior: dict[str, Any], take: tuple[str, ...] | None = None):
        """Select and build ``path``; its stages (or only those in ``take``) go to ``out``."""
        keep, table, outcome = _select(path, opts, runner, prior) if runner else (set(), {}, None)
        protos, refused = path.final_build(opts, originals, keep)
        out.update({k: v for k, v in protos.items() if take is None or k in take})
        refusals.extend(refused)
        layers.extend(_layer_rows(path, keep, table, opts))
        if outcome is not None:
            record.setdefault("outcome", {})["+".join(path.stages)] = outcome
        return {"keep": {_bare(g) for g in keep}, "table": {_bare(g): v for g, v in table.items()}}

    prior: dict[str, Any] = {}  # the split path's findings, reused for group_small and full
    for path in paths:
        found = run_path(path, stages, prior)
        if path.stages == ("user", "group"):
            prior = found
            if opts.group_small_rows:  # on the user graph just chosen: as it will be served
                small = _Path(
                    ("user", SMALL), {"user": out["user"], SMALL: canonical[SMALL]}, (SMALL,), per_stage
                )
                if runner is not None:
                    runner.fix(out["user"])
                originals = {"user": out["user"], SMALL: stages[SMALL]}
                kept = run_path(small, originals, prior, take=(SMALL,))["keep"]
                if {_bare(g) for g in small.groups} <= kept:  # all float: the group graph again
                    del out[SMALL]
                    layers[:] = [r for r in layers if r["stage"] != SMALL]
                    log.warning("group_small: every layer had to stay float for accuracy; not built")
    if SMALL in out:
        record[SMALL] = {"max_rows": opts.group_small_rows}
    record["layers"] = layers
    record["kept_float"] = [r["name"] for r in layers if r["why"].startswith("accuracy")]
    record["kept_float_for_speed"] = [r["name"] for r in layers if r["why"].startswith("speed")]
    record["refusals"] = sorted(set(refusals))
    record["weight_bytes"] = {k: _bytes(stages[k], out[k]) for k in out}
    return out, record


def tune_for_speed(
    stages: dict[str, onnx.ModelProto], opts: QuantizeOptions
) -> tuple[QuantizeOptions, dict[str, Any]]:
    """Pick each stage's speed configuration by timing it on this CPU (exporter.steps.quant_tune).

    Returns the options with the chosen per-stage ``min_elements``, ``per_token_stages`` and
    ``stages`` (a stage whose fp32 graph is fastest is not quantized) and the record for
    ``manifest.quantization.speed_tuning``. When no stage is faster quantized, each stage
    takes its fastest quantized configuration (the bundle is quantized for size) and the
    record and a warning say so.
    """
    from exporter.steps import quant_tune

    record: dict[str, Any] = {
        "cpu": quant_tune.cpu_name(),
        "threads": opts.tune_threads or "onnxruntime default",
        "accuracy_level": opts.accuracy_level,
        "stages": {},
    }
    builders = {}
    for stage in (s for s in ("user", "group", "full") if s in stages and s in opts.stages):
        builders[stage] = _config_builder(stage, stages[stage], opts)
        record["stages"][stage] = quant_tune.tune_stage(
            stage, stages[stage], builders[stage], threads=opts.tune_threads
        )
    tuned = record["stages"]
    if tuned and all(r["chosen"] == quant_tune.FP32 for r in tuned.values()):
        fallback = {s: r for s, r in tuned.items() if r["fastest_quantized"] is not None}
        for r in fallback.values():
            row = next(c for c in r["configs"] if c["config"] == r["fastest_quantized"])
            r.update(chosen=row["config"], min_elements=row["min_elements"], per_token=row["per_token"])
        record["fallback"] = (
            f"{opts.precision} is slower than fp32 on this CPU in every stage: each stage "
            "takes its fastest quantized configuration (quantized for size)"
        )
        log.warning("speed tuning: %s", record["fallback"])
    small_rows = 0
    if "group" in builders and opts.small_batch != 0:
        small_rows, tuned[SMALL] = _tune_small_group(stages["group"], builders["group"], tuned["group"], opts)
    chosen = {s: r for s, r in tuned.items() if r["chosen"] != quant_tune.FP32}
    if not small_rows:
        chosen.pop(SMALL, None)
    tuned_opts = dataclasses.replace(
        opts,
        stages=tuple(s for s in opts.stages if s in chosen or s not in tuned)
        + ((SMALL,) if small_rows else ()),
        per_token_stages=tuple(s for s, r in chosen.items() if r["per_token"]),
        stage_min_elements={s: int(r["min_elements"]) for s, r in chosen.items()},
        tune=False,
        group_small_rows=small_rows,
    )
    return tuned_opts, record


def _config_builder(stage: str, proto: onnx.ModelProto, opts: QuantizeOptions):
    """``build(min_elements, per_token)`` for ``quant_tune.tune_stage``, memoised (the small-batch
    tuning of the group stage times the same configurations again)."""
    from exporter.steps import quant_tune

    memo: dict[tuple[int, bool], Any] = {}

    def build(m: int, per_token: bool):
        if (m, per_token) not in memo:
            canon = _canonical(stage, proto, m, unroll=per_token)
            names = linear_layers(ir.serde.deserialize_model(canon), min_elements=m)
            memo[m, per_token] = None
            if names:
                q = ir.serde.serialize_model(_quantize_canonical(canon, opts, names, m).model)
                memo[m, per_token] = (q, names, quant_tune.quantized_elements(canon, names))
        return memo[m, per_token]

    return build


def _tune_small_group(
    proto: onnx.ModelProto, build, large: dict[str, Any], opts: QuantizeOptions
) -> tuple[int, dict[str, Any]]:
    """(max_rows of a ``group_small`` stage, 0 for none; its tuning record).

    The group graph's configurations timed again at ``SMALL_BATCH`` candidates; if another
    one than the large-batch choice wins there, both graphs are timed at growing N and the
    small graph serves calls up to the crossover. ``opts.small_batch`` K > 0 forces the
    stage (the configuration fastest at batch 1 among the quantized ones) for up to K."""
    from exporter.steps import quant_tune

    rec = quant_tune.tune_stage(
        SMALL, proto, build, batch=quant_tune.SMALL_BATCH, threads=opts.tune_threads
    )
    if opts.small_batch:  # forced: the fastest quantized configuration at batch 1
        name = rec["chosen"] if rec["chosen"] != quant_tune.FP32 else rec["fastest_quantized"]
        if name is None:
            rec["why"] = "the group stage has no layer to quantize"
            return 0, rec
        row = next(c for c in rec["configs"] if c["config"] == name)
        rec.update(chosen=name, min_elements=row["min_elements"], per_token=row["per_token"])
        rec.update(max_rows=int(opts.small_batch), why=f"forced (small_batch={opts.small_batch})")
        return int(opts.small_batch), rec
    if rec["chosen"] in (quant_tune.FP32, large["chosen"]):
        rec["why"] = (
            f"at batch {quant_tune.SMALL_BATCH} the choice is {rec['chosen']}, as for large "
            "calls: one group graph serves every call"
            if rec["chosen"] == large["chosen"]
            else f"fp32 is fastest at batch {quant_tune.SMALL_BATCH} too"
        )
        rec["max_rows"] = 0
        return 0, rec
    small_proto = build(int(rec["min_elements"]), bool(rec["per_token"]))[0]
    large_proto = (
        proto
        if large["chosen"] == quant_tune.FP32
        else build(int(large["min_elements"]), bool(large["per_token"]))[0]
    )
    rows, timings = quant_tune.crossover(small_proto, large_proto, threads=opts.tune_threads)
    rec.update(max_rows=rows, crossover=timings)
    rec["why"] = (
        f"{rec['chosen']} beats the large-batch choice ({large['chosen']}) up to {rows} "
        "candidates per call"
        if rows
        else f"{rec['chosen']} lost to the large-batch graph at N={quant_tune.SMALL_BATCH} when "
        "timed against it"
    )
    return rows, rec


_PASSES = {
    "ort-cpu": ["canonicalize_linear", "QuantizeWeightsInt8Pass", "LowerToMatMulNBitsPass"],
    "gpu": ["canonicalize_linear", "QuantizeWeightsInt8Pass", "Fp16ActivationsPass"],
    "qdq": ["canonicalize_linear", "QuantizeWeightsInt8Pass"],
}


def _canonical(
    stage: str,
    proto: onnx.ModelProto,
    min_elements: int = 0,
    keep_batched: Iterable[str] = (),
    unroll: bool = True,
) -> onnx.ModelProto:
    model = ir.serde.deserialize_model(proto)
    try:
        canonicalize_linear(
            model,
            unroll_batched=unroll,
            unroll_min_elements=min_elements,
            keep_batched=frozenset(keep_batched),
        )
    except Exception as e:  # noqa: BLE001 - name the stage, keep the cause
        raise ExportError(
            f"cannot canonicalise {stage}.onnx for quantization: {type(e).__name__}: {e}"
        ) from e
    return ir.serde.serialize_model(model)


def _select(path: _Path, opts: QuantizeOptions, runner: _Runner, prior: dict[str, Any]):
    """(groups kept in float, per-group effect table, outcome record) for one serving path.

    ``prior`` carries what the split path found ({"table", "keep"} by bare group name): the
    full graph holds the same layers, so their effects are reused and its float set tried first.
    """
    limits = opts.limits()
    everything = runner.measure(path.build(opts)[0], limits)
    table = _effects(path, opts, runner, limits, prior.get("table", {}))
    outcome: dict[str, Any] = {"all_quantized": everything}
    keep, current = [], everything
    hinted = [g for g in path.groups if _bare(g) in prior.get("keep", ())]
    if hinted and not everything["passed"]:
        trial = runner.measure(path.build(opts, keep_float=hinted)[0], limits)
        if trial["passed"]:
            keep, current = hinted, trial
    if opts.select and not current["passed"]:
        ranked = sorted(path.groups, key=lambda g: budget_damage(table[g], limits), reverse=True)
        keep, current = _bisect(path, opts, runner, limits, ranked)
    outcome["selected"], outcome["kept_float"] = current, keep
    n_cal = len(next(iter(runner.calib.reference.values())))
    outcome["auc_resolution"] = quant_noise.auc_resolution(
        current, "+".join(path.stages), n_cal, runner.calib.heldout_rows
    )
    if not current["passed"]:
        log.warning(
            "quantization of %s misses the budget: %s", "+".join(path.stages), current["breaches"]
        )
    return set(keep), table, outcome


def _bare(group: str) -> str:
    return group.split(":", 1)[1]


def _effects(path: _Path, opts, runner: _Runner, limits, prior: dict[str, Any]) -> dict[str, Any]:
    """Each group quantized alone, everything else float: its effect on the outputs vs eager."""
    table = {}
    for g in path.groups:
        if _bare(g) in prior:
            table[g] = {**prior[_bare(g)], "measured_on": prior[_bare(g)].get("measured_on")}
        else:
            table[g] = {
                **runner.measure(path.build(opts, only=[g])[0], limits),
                "measured_on": "+".join(path.stages),
            }
    return table


def _bisect(path: _Path, opts, runner: _Runner, limits, ranked: list[str]):
    """Smallest k (by bisection over the damage ranking) whose top-k groups in float pass."""
    lo, hi = 0, len(ranked)  # k=lo is known to fail; k=hi (all float) is the fp32 graph
    tried: dict[int, dict[str, Any]] = {}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tried[mid] = runner.measure(path.build(opts, keep_float=ranked[:mid])[0], limits)
        log.info(
            "quantize %s: %d group(s) in float -> passed=%s",
            "+".join(path.stages),
            mid,
            tried[mid]["passed"],
        )
        lo, hi = (lo, mid) if tried[mid]["passed"] else (mid, hi)
    if hi not in tried:
        tried[hi] = runner.measure(path.build(opts, keep_float=ranked[:hi])[0], limits)
    return ranked[:hi], tried[hi]


def _layer_rows(
    path: _Path, keep: set[str], table: dict[str, Any], opts: QuantizeOptions
) -> list[dict[str, Any]]:
    """One manifest row per layer group: precision, kernel, why, and its measured effect."""
    kernel = {
        "ort-cpu": f"MatMulNBits(bits={opts.bits}, accuracy_level={opts.accuracy_level})",
        "gpu": "DequantizeLinear(fp16) -> MatMul(fp16)",
        "qdq": "DequantizeLinear -> MatMul",
    }[opts.target]
    rows = []
    for g, members in path.groups.items():
        effect = table.get(g)
        rows.append(
            {
                "name": g,
                "stage": members[0][0],
                "weights": len(members),
                "precision": "fp32" if g in keep else f"int{opts.bits}",
                "kernel": "fp32 MatMul" if g in keep else kernel,
                "why": "accuracy: kept in float by the selection to meet the budget"
                if g in keep
                else "quantized: within the budget",
                "effect": None
                if effect is None
                else {
                    **{k: v for o in effect["outputs"].values() for k, v in o.items()},
                    "measured_on": effect["measured_on"],
                },
            }
        )
    for stage, weight, why in path.small:
        rows.append(
            {
                "name": f"{stage}:{weight}",
                "stage": stage,
                "weights": 1,
                "precision": "fp32",
                "kernel": "fp32 MatMul",
                "why": f"speed: {why}",
                "effect": None,
            }
        )
    return rows


def _bytes(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, int]:
    """Linear-layer weight bytes of a stage as exported (fp32) and as quantized."""
    b = linear_weight_bytes(ir.serde.deserialize_model(before))
    a = linear_weight_bytes(ir.serde.deserialize_model(after))
    return {
        "fp32": a["fp32"] or b["fp32"],
        "quantized": a["quantized"],
        "layers": a["layers"],
        "quantized_layers": a["quantized_layers"],
        "quantized_layers_fp32": a["quantized_layers_fp32"],
        "quantized_layers_bytes": a["quantized_layers_bytes"],
    }


CALIBRATION_ROWS = 2000
CANDIDATES_PER_REQUEST = 100


def calibration_for(
    module: Any,
    spec: Any,
    data: Rows | None,
    *,
    skip_rows: int = 0,
    n_rows: int = CALIBRATION_ROWS,
    seed: int = 0,
    request_scoped: bool = False,
) -> Calibration:
    """Held-out rows for selection and the eager fp32 model's outputs on them.

    With ``data``, rows after the first ``skip_rows`` (those parity checks) are used, so the
    parity verdict is measured on rows the selection never saw; without, requests of 100
    candidates are sampled from the spec (``seed + 1``: not the parity sample either).
    """
    from exporter.steps.parity.stages import eager_outputs
    from runtime.sample import sample_requests

    labels = rids = None
    if data is not None and len(data[spec.inputs[0].name]) > skip_rows + 100:
        sl = slice(skip_rows, skip_rows + n_rows)
        rows = {s.name: np.ascontiguousarray(data[s.name][sl]) for s in spec.inputs}
        labels = np.asarray(data["label"][sl]) if "label" in data else None
        rids = np.asarray(data["request_id"][sl]) if "request_id" in data else None
    else:
        per = CANDIDATES_PER_REQUEST
        rows, rids = sample_requests(spec, max(1, n_rows // per), per, seed=seed + 1)
    from exporter.steps.parity.configs import request_chunks, run_in_chunks
    from exporter.steps.parity.stages import user_rows

    module = module.eval()
    groups = request_groups(rids if rids is not None else user_rows(spec, rows)[1])
    chunks = groups if request_scoped else list(request_chunks(groups, 512))
    reference = run_in_chunks(lambda part: eager_outputs(module, spec, part), rows, chunks)
    return Calibration(rows, reference, labels, rids, request_scoped)


def step_quantize(ctx: Any) -> None:
    """Pipeline step (exporter.pipeline): quantize ctx.stages per ctx.options.precision.

    Reads ``options.extra``: ``target`` ("onnx" -> ORT CPU MatMulNBits, "trt" -> fp16
    activations for TensorRT), ``budgets`` (the parity budgets file; its entry for the
    precision is the selection budget), optional ``quant_block_size`` / ``quant_accuracy_level``
    / ``quant_stages`` (e.g. ["user"]) / ``quant_min_elements`` / ``quant_per_token_stages``
    (None: timed per stage on this CPU for ort-cpu, ``tune_for_speed``) / ``quant_tune``
    (False: the fixed ``TARGET_DEFAULTS`` instead of timing) / ``quant_small_batch``
    (``QuantizeOptions.small_batch``: None timed, 0 off, K forced) / ``serve_threads`` (the
    intra-op threads the bundle will be served with: the speed choices are timed with them;
    None: ONNX Runtime's default).
    """
    o = ctx.options
    if o.precision == "fp32":
        return
    extra = o.extra or {}
    budget = None
    if extra.get("budgets"):
        from exporter.steps.parity.budgets import load_budgets

        budget = load_budgets(extra["budgets"]).for_stage("quantize", o.precision)
    opts = QuantizeOptions(
        precision=o.precision,
        target="gpu" if extra.get("target") == "trt" else "ort-cpu",
        block_size=extra.get("quant_block_size"),
        accuracy_level=int(extra.get("quant_accuracy_level", 4)),
        budget=budget,
        stages=tuple(extra.get("quant_stages") or ("full", "user", "group")),
        min_elements=extra.get("quant_min_elements"),
        per_token_stages=(
            None
            if extra.get("quant_per_token_stages") is None
            else tuple(extra["quant_per_token_stages"])
        ),
        tune=None if extra.get("quant_tune", True) else False,
        small_batch=extra.get("quant_small_batch"),
        tune_threads=extra.get("serve_threads"),
    )
    n_parity, n_calib = ctx.row_budget()
    scope = ctx.manifest_fields.get("row_scope")
    scoped = scope is not None and scope.full == "request"
    calib = calibration_for(
        ctx.loaded.eager(),
        ctx.spec,
        o.data,
        skip_rows=n_parity,
        n_rows=n_calib,
        seed=o.seed,
        request_scoped=scoped,
    )
    if ctx.store_rows is not None:  # cut tables: the stages read the store's rows
        calib.rows = ctx.store_rows(calib.rows)
    calib.heldout_rows = n_parity
    stages, record = quantize_bundle_stages(ctx.stages, ctx.graph_spec, options=opts, calibration=calib)
    ctx.stages.update(stages)
    if SMALL in stages:
        ctx.stage_meta[SMALL] = {"max_rows": record[SMALL]["max_rows"]}
    ctx.manifest_fields["quantization"] = Quantization.from_dict(record, "quantize step")
