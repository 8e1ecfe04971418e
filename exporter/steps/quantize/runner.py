"""Quantize step, job 4: its own ONNX Runtime sessions, scoring candidate graphs on the
calibration rows against the eager reference (``_Runner.measure``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from exporter.errors import ExportError
from exporter.evaluate.budgets import evaluate
from exporter.evaluate.metrics import output_metrics, request_groups
from exporter.steps.quantize import noise
from exporter.steps.quantize.calibrate import Calibration, Rows
from runtime.manifest import SMALL_GROUP as SMALL


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
        from exporter.evaluate.stages import user_rows

        return user_rows(self.spec, self.calib.rows)[1]

    def run(self, protos: dict[str, onnx.ModelProto]) -> dict[str, np.ndarray]:
        if self.calib.request_scoped:  # one request per call, as the runtime serves it
            from exporter.evaluate.configs import run_in_chunks

            rows = self.calib.rows
            return run_in_chunks(lambda part: self._run_rows(protos, part), rows, self.groups)
        return self._run_rows(protos, self.calib.rows, cache=True)

    def _run_rows(self, protos, rows: Rows, cache: bool = False) -> dict[str, np.ndarray]:
        if "full" in protos:
            return self._session_run(protos["full"], dict(rows))
        from exporter.evaluate.stages import user_rows

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
            noise.add_margin(m, n_rows, self.calib.heldout_rows)
            outputs[name] = {**_summary(m), **noise.summary_fields(m, limits)}
            breaches += [f"{name}: {b}" for b in evaluate(m, limits)[0]]
        return {"passed": not breaches, "breaches": breaches, "outputs": outputs}


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_abs", "mean_abs", "abs_delta_auc", "delta_auc", "auc_ref")
    out = {k: m[k] for k in keys if m.get(k) is not None}
    for k in ("top10_overlap", "kendall_tau"):
        if isinstance(m.get(k), dict):
            out[f"{k}_mean"] = m[k]["mean"]
    return out
