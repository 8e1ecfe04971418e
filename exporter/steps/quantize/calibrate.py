"""Quantize step, job 3: the calibration set (held-out rows and the eager model's outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from exporter.evaluate.metrics import request_groups

Rows = dict[str, np.ndarray]

CALIBRATION_ROWS = 2000
CANDIDATES_PER_REQUEST = 100


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
    from exporter.evaluate.stages import eager_outputs
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
    from exporter.evaluate.configs import request_chunks, run_in_chunks
    from exporter.evaluate.stages import user_rows

    module = module.eval()
    groups = request_groups(rids if rids is not None else user_rows(spec, rows)[1])
    chunks = groups if request_scoped else list(request_chunks(groups, 512))
    reference = run_in_chunks(lambda part: eager_outputs(module, spec, part), rows, chunks)
    return Calibration(rows, reference, labels, rids, request_scoped)
