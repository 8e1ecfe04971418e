"""Noise-aware W8 selection: the selection judges as the held-out verdict will.

The quantizer (exporter.steps.quantize) measures each configuration on calibration rows; the
parity step then judges the bundle on held-out rows. Both apply
``exporter.evaluate.auc_noise.judge_auc`` to the |ΔAUC| budget; the selection predicts the
held-out verdict by widening its interval with the held-out rows' noise
(``auc_noise.predictive_se``). When even that interval cannot resolve the budget, the
logit error relative to the score spread decides (a warning line and
``manifest.quantization.outcome[path].auc_resolution`` say so), instead of keeping almost
every layer in float to beat noise.

Layers are ranked for the bisection by what the measurement resolves: the part of a
layer's |ΔAUC| beyond its own noise, and its logit error (both relative to their limits).
"""

from __future__ import annotations

import logging
from typing import Any

from exporter.evaluate import auc_noise

log = logging.getLogger(__name__)


def add_margin(metrics: dict[str, Any], n_rows: int, n_heldout: int | None) -> None:
    """Give ``metrics`` (one output, on calibration rows) the predictive se its verdict uses."""
    ci = metrics.get("delta_auc_ci")
    if ci:
        metrics["delta_auc_margin_se"] = auc_noise.predictive_se(ci["se"], n_rows, n_heldout)


def summary_fields(metrics: dict[str, Any], limits: dict[str, float]) -> dict[str, Any]:
    """The noise facts of one measured output for the manifest: interval, margin, mode."""
    out: dict[str, Any] = {}
    ci = metrics.get("delta_auc_ci")
    if ci:
        out["delta_auc_ci"] = [ci["ci_low"], ci["ci_high"]]
        out["delta_auc_se"] = ci["se"]
        out["delta_auc_margin_se"] = metrics.get("delta_auc_margin_se", ci["se"])
        if "abs_delta_auc" in limits:
            ok, mode, text = auc_noise.judge_auc(metrics, limits["abs_delta_auc"])
            out["auc_verdict"] = {"passed": ok, "mode": mode, "text": text}
    if metrics.get("logit_rel_rms") is not None:
        out["logit_rel_rms"] = metrics["logit_rel_rms"]
    return out


def damage_uses(out: dict[str, Any], limits: dict[str, float]) -> list[float]:
    """Budget shares of one output that a measurement resolves (for ranking layers)."""
    limit = limits.get("abs_delta_auc")
    if not limit or out.get("delta_auc") is None:
        return []
    uses = []
    se = out.get("delta_auc_se") or 0.0
    uses.append(max(0.0, abs(out["delta_auc"]) - auc_noise.Z * se) / limit)
    if out.get("logit_rel_rms") is not None:
        uses.append(out["logit_rel_rms"] / auc_noise.logit_tolerance(limit))
    return uses


def auc_resolution(measured: dict[str, Any], path: str, n_rows: int, n_heldout) -> dict[str, Any]:
    """How the selected configuration's |ΔAUC| budget was decided; warns when the rows
    could not resolve it (the logit criterion decided)."""
    verdicts = {
        o: v["auc_verdict"] for o, v in measured["outputs"].items() if v.get("auc_verdict")
    }
    unresolved = {o: v for o, v in verdicts.items() if v["mode"] == "unresolved"}
    rec: dict[str, Any] = {
        "calibration_rows": n_rows,
        "heldout_rows": n_heldout,
        "resolved": not unresolved,
        "verdicts": verdicts,
    }
    if unresolved:
        rec["criterion"] = "logit error relative to the score spread (and top-10 overlap)"
        text = "; ".join(f"{o}: {v['text']}" for o, v in unresolved.items())
        log.warning(
            "quantization of %s: %d calibration rows (held-out %s) cannot resolve the ΔAUC "
            "budget; selected by logit error relative to the score spread instead (%s)",
            path, n_rows, n_heldout, text,
        )
    return rec
