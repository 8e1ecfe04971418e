"""Distillation in the Rec-Distill manner, on synthetic data from a known click model.

1. A larger teacher (a big DCN) learns from the labels of a longer log: the students'
   rows plus ``teacher_data_factor - 1`` times as many more, as production teachers do.
2. The student learns from the labels plus the teacher's logits:
   ``BCE(z_s, y) + alpha * T^2 * BCE(sigmoid(z_s / T), sigmoid(z_t / T))``.
3. The same student (same initialisation, same batches) learns from the labels alone:
   the control.

On the held-out requests the report gives the teacher's AUC, both students' AUCs, the
share of the teacher's gain the distilled student recovers,
``(AUC_distilled - AUC_labels_only) / (AUC_teacher - AUC_labels_only)``, and the
Bayes-optimal AUC (the true probabilities scored on the same labels).

    from students.train import distill
    report = distill(kind="rankmixer", size="tiny", out_dir="runs/rm")

writes ``runs/rm/{teacher,student,student_labels_only}/`` (checkpoint directories, see
:mod:`students.checkpoint`), ``runs/rm/heldout.npz`` (named as the student's spec) and
``runs/rm/report.json``. ``python -m students.train --help`` for the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from students.base import Student, model_inputs
from students.checkpoint import load_checkpoint, save_checkpoint
from students.data import make_dataset, rename, save_npz, take
from students.metrics import auc, bayes_auc, expected_bayes_auc, log_loss
from students.zoo import FACTORY, KINDS, build_model, model_kwargs

__all__ = ["TrainConfig", "distill", "fit", "predict_logits", "evaluate"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How much data and how many passes (defaults: sized for ``tiny`` on a small CPU)."""

    n_train: int = 60_000  # the students' rows
    teacher_data_factor: int = 3  # the teacher learns from this many times more rows (a longer log)
    n_requests: int = 400
    candidates: int = 50
    epochs: int = 2
    teacher_epochs: int = 2
    batch_size: int = 1024
    lr: float = 1e-2
    alpha: float = 1.0  # weight of the distillation term
    temperature: float = 1.0
    max_steps: int | None = None  # cap on optimiser steps per model (short bench runs)
    threads: int | None = 1  # small models train fastest single-threaded on shared cores
    control: bool = True  # also train the labels-only student (the baseline of the report)
    aux_weight: float = 0.01  # weight of a MoE student's load-balance loss (``aux_loss()``)


TRAIN_CONFIGS = {
    "tiny": TrainConfig(),
    # bench models are for export and benchmarks: trained briefly, without the control
    "bench": TrainConfig(
        n_train=40_000,
        teacher_data_factor=1,
        n_requests=100,
        candidates=100,
        epochs=1,
        teacher_epochs=1,
        batch_size=256,
        lr=3e-3,
        max_steps=120,
        control=False,
    ),
}


def _batches(n: int, batch_size: int, epochs: int, seed: int, max_steps: int | None):
    """Shuffled index batches; the same seed gives the same batches (for the control)."""
    rng = np.random.default_rng(seed)
    steps = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for lo in range(0, n, batch_size):
            if max_steps is not None and steps >= max_steps:
                return
            steps += 1
            yield order[lo : lo + batch_size]


def _n_steps(n: int, cfg: TrainConfig, epochs: int) -> int:
    steps = epochs * -(-n // cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


def fit(
    model: Student,
    rows: dict[str, np.ndarray],
    cfg: TrainConfig,
    *,
    epochs: int,
    seed: int,
    teacher_logits: np.ndarray | None = None,
    progress: Any = None,
    desc: str = "train",
) -> dict[str, float]:
    """Train ``model`` on ``rows`` (labels, plus teacher logits if given); returns the last loss."""
    model.train()
    total = _n_steps(len(rows["label"]), cfg, epochs)
    optimizers, schedulers = _optimizers(model, cfg.lr, total)
    task = progress.add_task(desc, total=total) if progress is not None else None
    labels = torch.from_numpy(rows["label"])
    soft = None if teacher_logits is None else torch.from_numpy(teacher_logits.astype(np.float32))
    t = cfg.temperature
    loss = torch.zeros(())
    for idx in _batches(len(labels), cfg.batch_size, epochs, seed, cfg.max_steps):
        z = model.logits(**model_inputs(model, rows, idx))
        loss = F.binary_cross_entropy_with_logits(z, labels[idx])
        if soft is not None:
            target = torch.sigmoid(soft[idx] / t)
            loss = loss + cfg.alpha * t * t * F.binary_cross_entropy_with_logits(z / t, target)
        aux = model.aux_loss() if hasattr(model, "aux_loss") else None
        if aux is not None:  # MoE students: the load-balance loss of this forward
            loss = loss + cfg.aux_weight * aux
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt, sched in zip(optimizers, schedulers, strict=True):
            opt.step()
            sched.step()
        if task is not None:
            progress.update(task, advance=1, description=f"{desc} loss {loss.item():.4f}")
    model.eval()
    return {"final_loss": float(loss.item()), "steps": total}


def _optimizers(model: Student, lr: float, total: int):
    """SparseAdam for embedding tables (sparse gradients), Adam for the rest; one-cycle lr."""
    sparse = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    optimizers = [torch.optim.Adam(dense, lr=lr)] + (
        [torch.optim.SparseAdam(sparse, lr=lr)] if sparse else []
    )
    schedulers = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=max(total, 1), pct_start=0.1)
        for o in optimizers
    ]
    return optimizers, schedulers


@torch.no_grad()
def predict_logits(
    model: Student, rows: dict[str, np.ndarray], batch_size: int = 8192
) -> np.ndarray:
    """Logits for every row (eval mode)."""
    model.eval()
    n = len(next(iter(rows.values())))
    out = [
        model.logits(**model_inputs(model, rows, slice(lo, lo + batch_size))).numpy()
        for lo in range(0, n, batch_size)
    ]
    return np.concatenate(out).astype(np.float32)


def evaluate(model: Student, rows: dict[str, np.ndarray]) -> dict[str, float]:
    """Held-out AUC and log-loss of ``model`` against ``rows['label']``."""
    z = predict_logits(model, rows)
    prob = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    return {"auc": auc(rows["label"], prob), "logloss": log_loss(rows["label"], prob)}


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )


def _train_one(
    name: str,
    *,
    kind: str,
    size: str,
    seed: int,
    rows,
    held,
    cfg: TrainConfig,
    out: Path,
    progress,
    epochs: int,
    teacher_logits=None,
) -> tuple[Student, dict]:
    """Build (seeded), train, evaluate and checkpoint one model."""
    kwargs = model_kwargs(kind, size)
    torch.manual_seed(seed)
    model = build_model(**kwargs)
    start, cpu_start = time.perf_counter(), time.process_time()
    hist = fit(
        model,
        rows,
        cfg,
        epochs=epochs,
        seed=seed,
        teacher_logits=teacher_logits,
        progress=progress,
        desc=name,
    )
    metrics = {
        **evaluate(model, held),
        **hist,
        "train_seconds": time.perf_counter() - start,
        "train_cpu_seconds": time.process_time() - cpu_start,  # vs wall: how shared the cores were
        "distilled": teacher_logits is not None,
        "train_config": asdict(cfg),
    }
    save_checkpoint(model, FACTORY, kwargs, model.feature_spec(), out / name, metrics)
    log.info("%s: held-out AUC %.4f in %.1fs", name, metrics["auc"], metrics["train_seconds"])
    return model, metrics


def distill(
    kind: str = "rankmixer",
    size: str = "tiny",
    out_dir: str | Path = "runs/student",
    seed: int = 0,
    progress: bool = True,
    teacher_dir: str | Path | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train teacher, distilled student and labels-only student; write checkpoints and a report.

    ``teacher_dir`` reuses a teacher checkpoint (from an earlier run on the same ``size``
    and ``seed``) instead of training one. ``overrides`` replace TrainConfig fields
    (e.g. ``max_steps=20``).
    """
    cfg = replace(TRAIN_CONFIGS[size], **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        t0, cpu0 = time.perf_counter(), time.process_time()
        n_log = cfg.n_train * max(1, cfg.teacher_data_factor)
        _world, log_rows, held = make_dataset(size, n_log, cfg.n_requests, cfg.candidates, seed)
        rows = take(log_rows, slice(0, cfg.n_train))
        with _progress(progress) as bar:
            teacher, t_metrics = _teacher(size, seed, log_rows, held, cfg, out, bar, teacher_dir)
            soft = predict_logits(teacher, rows)
            common = dict(
                kind=kind,
                size=size,
                seed=seed + 1,
                rows=rows,
                held=held,
                cfg=cfg,
                out=out,
                progress=bar,
                epochs=cfg.epochs,
            )
            student, s_metrics = _train_one("student", teacher_logits=soft, **common)
            c_metrics = _train_one("student_labels_only", **common)[1] if cfg.control else None
        save_npz(out / "heldout.npz", rename(held, student.input_names))
        report = _report(kind, size, seed, held, t_metrics, s_metrics, c_metrics, out)
        report["total_seconds"] = time.perf_counter() - t0
        report["total_cpu_seconds"] = time.process_time() - cpu0
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report
    finally:
        torch.set_num_threads(prev_threads)


def _teacher(size, seed, rows, held, cfg, out, bar, teacher_dir) -> tuple[Student, dict]:
    if teacher_dir is None:
        return _train_one(
            "teacher",
            kind="teacher",
            size=size,
            seed=seed,
            rows=rows,
            held=held,
            cfg=cfg,
            out=out,
            progress=bar,
            epochs=cfg.teacher_epochs,
        )
    teacher = load_checkpoint(teacher_dir)
    metrics = {
        **json.loads((Path(teacher_dir) / "metrics.json").read_text()),
        **evaluate(teacher, held),
        "reused_from": str(teacher_dir),
    }
    return teacher, metrics


def _report(kind, size, seed, held, t, s, c, out: Path) -> dict[str, Any]:
    """The numbers of a run; labels-only entries are None when the control was not trained."""
    c = c or {}
    share = None
    if c and t["auc"] - c["auc"] > 0:
        share = (s["auc"] - c["auc"]) / (t["auc"] - c["auc"])
    names = ("teacher", "student", "student_labels_only") if c else ("teacher", "student")
    return {
        "kind": kind,
        "size": size,
        "seed": seed,
        "heldout_rows": int(len(held["label"])),
        "heldout_requests": int(held["request_id"].max() + 1),
        "bayes_auc": bayes_auc(held["label"], held["prob"]),
        "bayes_auc_expected": expected_bayes_auc(held["prob"]),
        "teacher_auc": t["auc"],
        "student_auc": s["auc"],
        "student_labels_only_auc": c.get("auc"),
        "recovered_share": share,
        "teacher_logloss": t["logloss"],
        "student_logloss": s["logloss"],
        "student_labels_only_logloss": c.get("logloss"),
        "train_seconds": {
            "teacher": t.get("train_seconds"),
            "student": s["train_seconds"],
            "student_labels_only": c.get("train_seconds"),
        },
        "checkpoints": {n: str(out / n) for n in names},
        "heldout": str(out / "heldout.npz"),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m students.train --kind rankmixer --size tiny --out runs/rm``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="rankmixer", choices=sorted(KINDS))
    p.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="cap on optimiser steps per model")
    p.add_argument("--teacher", help="reuse this teacher checkpoint directory")
    p.add_argument("--no-control", action="store_true", help="skip the labels-only student")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    extra: dict[str, Any] = {"max_steps": args.steps} if args.steps else {}
    if args.no_control:
        extra["control"] = False
    report = distill(args.kind, args.size, args.out, args.seed, teacher_dir=args.teacher, **extra)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
