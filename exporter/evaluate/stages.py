"""The things parity compares: the eager reference and each compiled stage of a bundle.

A stage runner takes rows (arrays keyed by spec input name, N rows) and returns
{output name: array [N, ...]}. Split stages run the user graph once per distinct
user row in a batch and the group graph on every candidate, as the runtime does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from exporter.errors import ExportError
from exporter.steps.capture import to_torch_inputs
from runtime.backends.ort import OrtBackend
from runtime.bundle import Bundle
from runtime.embstore import budget_precision, store_suffix
from runtime.manifest import SMALL_GROUP
from runtime.scorer import USER_INDEX, Scorer
from runtime.spec import FeatureSpec

log = logging.getLogger(__name__)
Rows = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


@dataclass
class Stage:
    """One compiled stage: a name, its precision, and a runner (or why it cannot run here)."""

    name: str
    precision: str
    run: Callable[[Rows], Outputs] | None = None
    skip_reason: str | None = None
    scorer: Callable[[], Scorer] | None = None  # runtime stages: the scorer behind ``run``


def eager_outputs(model: torch.nn.Module, spec: FeatureSpec, rows: Rows) -> Outputs:
    """Run the eager model on ``rows``; its outputs named per ``spec.outputs``."""
    with torch.no_grad():
        out = model(**to_torch_inputs(spec, rows))
    if isinstance(out, torch.Tensor):
        out = (out,)
    elif isinstance(out, dict):
        out = tuple(out.values())
    if len(out) != len(spec.outputs):
        raise ExportError(
            f"the eager model returned {len(out)} output(s) but spec '{spec.name}' names "
            f"{len(spec.outputs)} ({list(spec.outputs)})"
        )
    return {n: t.detach().float().numpy() for n, t in zip(spec.outputs, out, strict=True)}


def user_rows(spec: FeatureSpec, rows: Rows) -> tuple[Rows, np.ndarray]:
    """Distinct users among ``rows`` (by their user-side values) and each row's user index."""
    n = len(next(iter(rows.values())))
    parts = []
    for s in spec.inputs:
        if s.side == "user":
            parts.append(np.ascontiguousarray(rows[s.name]).reshape(n, -1).view(np.uint8))
        elif s.side == "mixed":
            cols = np.ascontiguousarray(rows[s.name][..., s.user_columns()])
            parts.append(cols.reshape(n, -1).view(np.uint8))
    if not parts:
        return {}, np.zeros(n, dtype=np.int64)
    key = np.concatenate([p.reshape(n, -1) for p in parts], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # users numbered by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    user_index = rank[inverse.ravel()].astype(np.int64)
    firsts = first[order]
    users = {s.name: rows[s.name][firsts] for s in spec.inputs if s.side in ("user", "mixed")}
    return users, user_index


def _scorer_runner(scorer: Scorer, spec: FeatureSpec) -> Callable[[Rows], Outputs]:
    def run(rows: Rows) -> Outputs:
        users, user_index = user_rows(spec, rows)
        cands = {s.name: rows[s.name] for s in spec.group_inputs}
        return scorer.run_batch(users, cands, user_index)

    return run


def bundle_stages(
    bundle: Bundle, names: list[str] | None = None, program: Callable[[], Any] | None = None
) -> list[Stage]:
    """The compiled stages of ``bundle`` that parity knows, filtered by ``names`` when given.

    ``program`` returns the model's ExportedProgram; with it a split bundle also gets the
    ``split-eager`` stage (the split pass's FX graphs run in PyTorch).
    """
    m = bundle.manifest
    suffix = "" if m.precision == "fp32" else f"-{m.precision}"
    suffix += store_suffix(m)  # int8/fp16 embedding tables: their own name and budget
    backend = OrtBackend(intra_op_threads=1)
    stages = []
    if m.is_split and program is not None:
        stages.append(Stage("split-eager", "fp32", _split_eager(m.spec, program)))
    stages.append(_runtime_stage(f"onnx-full{suffix}", bundle, backend, False))
    if m.is_split:
        stages.append(_runtime_stage(f"onnx-split{suffix}", bundle, backend, True, "group"))
    if m.small_group_rows:  # every row through group_small, whatever the batch: its numbers
        stages.append(_runtime_stage(f"onnx-split-small{suffix}", bundle, backend, True, SMALL_GROUP))
    stages.append(_trt_stage(bundle, f"tensorrt{suffix}"))
    if names:
        known = {s.name for s in stages}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ExportError(
                f"bundle '{bundle.root}' has no parity stage(s) {unknown}; it has: {sorted(known)}"
            )
        stages = [s for s in stages if s.name in names]
    return stages


def _runtime_stage(name: str, bundle: Bundle, backend, split: bool, group: str = "auto") -> Stage:
    """A stage the runtime's Scorer runs; its sessions open on first use (skips cost nothing)."""
    holder: dict[str, Scorer] = {}

    def scorer() -> Scorer:
        if "scorer" not in holder:
            holder["scorer"] = Scorer(bundle, backend, use_split=split, group_variant=group)
        return holder["scorer"]

    def run(rows: Rows) -> Outputs:
        return _scorer_runner(scorer(), bundle.manifest.spec)(rows)

    return Stage(name, budget_precision(bundle.manifest), run, scorer=scorer)


def _split_eager(spec: FeatureSpec, program: Callable[[], Any]) -> Callable[[Rows], Outputs]:
    """The UG split's user and group GraphModules, run eagerly like the runtime runs the ONNX."""
    holder: dict[str, Any] = {}

    def run(rows: Rows) -> Outputs:
        if "split" not in holder:
            from graph_passes.fx import SplitUserGroupPass

            holder["split"] = SplitUserGroupPass(spec).call(program()).graph_module
        res = holder["split"]
        if not res.is_split:
            raise ExportError(
                f"the split pass does not split '{spec.name}' now, yet the bundle is split"
            )
        users, user_index = user_rows(spec, rows)
        with torch.no_grad():
            boundary = _as_tuple(res.user(*[torch.from_numpy(users[n]) for n in res.user_inputs]))
            feeds = {b["name"]: t for b, t in zip(res.boundary, boundary, strict=True)}
            feeds[USER_INDEX] = torch.from_numpy(user_index)
            feeds.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rows.items()})
            out = _as_tuple(res.group(*[feeds[n] for n in res.group_inputs]))
        return {n: t.float().numpy() for n, t in zip(spec.outputs, out, strict=True)}

    return run


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _trt_stage(bundle: Bundle, name: str) -> Stage:
    """TensorRT engines when this machine can run them; otherwise a skipped stage saying why."""
    m = bundle.manifest
    if not m.engines:
        return Stage(name, m.precision, skip_reason="the bundle has no TensorRT engines")
    try:
        from runtime.backends import backend_class

        cls = backend_class("tensorrt")
        reason = cls.availability(bundle)
    except Exception as e:  # noqa: BLE001 - any import problem means: not on this machine
        cls, reason = None, str(e)
    if reason:
        return Stage(name, m.precision, skip_reason=reason)
    return _runtime_stage(name, bundle, cls(), m.is_split)
