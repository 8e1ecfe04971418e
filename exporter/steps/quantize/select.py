"""Quantize step, job 5: sensitivity-guided selection of the layers kept in float.

Each layer group is measured alone; when everything quantized misses the budget, the most
damaging groups (``budget_damage``) stay float, the fewest the ranking allows (bisection).
"""

from __future__ import annotations

import logging
from typing import Any

from exporter.steps.quantize import noise
from exporter.steps.quantize.build import _Path
from exporter.steps.quantize.options import QuantizeOptions
from exporter.steps.quantize.runner import _Runner

log = logging.getLogger(__name__)


def budget_damage(measured: dict[str, Any], limits: dict[str, float]) -> tuple[float, float]:
    """(share of the budget used at its tightest metric, mean abs error) of a measurement.

    1.0 = exactly at a limit. "max" metrics use value / limit; "min" metrics in [0, 1]
    (top-10 overlap) use (1 - value) / (1 - limit). Ranking layers by this, rather than by
    raw error, keeps in float the layers that hurt what the budget checks: on the bench
    RankMixer a user-side layer shifts every candidate alike (large abs error, top-10
    unchanged) while a group-side head layer reorders candidates (small error, top-10 0.72).
    """
    from exporter.evaluate.budgets import LIMITS

    worst = 0.0
    for out in measured["outputs"].values():
        for key, limit in limits.items():
            value = out.get(key)
            if key == "abs_delta_auc" and out.get("delta_auc_se") is not None:
                continue  # judged by what its interval resolves (noise.damage_uses)
            if key not in LIMITS or not isinstance(value, int | float) or value != value:
                continue
            if LIMITS[key][1] == "max":
                use = value / limit if limit > 0 else (float("inf") if value > 0 else 0.0)
            else:
                use = (1 - value) / (1 - limit) if limit < 1 else float(value < 1) * 1e9
            worst = max(worst, use)
        worst = max([worst, *noise.damage_uses(out, limits)])
    mean_abs = max((o.get("mean_abs", 0.0) for o in measured["outputs"].values()), default=0.0)
    return worst, mean_abs


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
    outcome["auc_resolution"] = noise.auc_resolution(
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
