"""Admission by deadline: refuse at once what could not be answered within the latency budget.

A bounded queue alone does not keep latency: 512 (or even 32) queued requests can be
seconds of work, and every one of them is admitted to wait. Instead each request is
admitted only if its estimated completion fits the budget. With continuous batching a
request admitted now runs in the batch after the one in flight, together with everything
queued, so

    estimate = remaining time of the batches in flight
             + batch_time(queued candidates + its own candidates)

where ``batch_time(n) = fixed + n x per_candidate`` is fitted to the executed batches
(exponentially weighted least squares: recent batches count most, and the fixed cost of a
call is not smeared over its candidates). The excess gets a fast 429 with
``Retry-After``, and the admitted keep their latency.

The budget is ``--latency-budget-ms`` when given; by default it is derived from the
measured service time of a request running alone (an EWMA over single-request batches,
i.e. what an unloaded server answers in, seeded by the warm-up): ``BUDGET_FACTOR`` times
that, and at least ``MIN_BUDGET_S``. An idle server admits any request, however large.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

BUDGET_FACTOR = 2.0  # admitted latency <= ~2x the unloaded service time (issue 18's goal)
MIN_BUDGET_S = 0.05  # below this, HTTP, timer and scheduling noise (a shared CPU) dominate
ALPHA = 0.1  # EWMA weight of the newest batch


@dataclass
class Estimate:
    """What admission decided for one request."""

    admitted: bool
    wait_s: float  # estimated completion time if admitted now
    budget_s: float

    @property
    def retry_after_s(self) -> int:
        """Whole seconds for ``Retry-After`` (at least 1)."""
        return max(1, math.ceil(self.wait_s - self.budget_s))


class BatchTimeModel:
    """``seconds = fixed + per_candidate x candidates``, fitted by exponentially weighted least squares."""

    def __init__(self) -> None:
        self.n = self.t = self.nn = self.nt = None  # EW means of N, T, N^2, N*T

    @property
    def ready(self) -> bool:
        return self.n is not None

    def observe(self, candidates: int, seconds: float) -> None:
        x = (candidates, seconds, candidates * candidates, candidates * seconds)
        if self.n is None:
            self.n, self.t, self.nn, self.nt = (float(v) for v in x)
            return
        self.n, self.t, self.nn, self.nt = (
            (1 - ALPHA) * old + ALPHA * new for old, new in zip((self.n, self.t, self.nn, self.nt), x, strict=True)
        )

    def coefficients(self) -> tuple[float, float]:
        """(fixed seconds, seconds per candidate); all cost per candidate when sizes never varied."""
        var = self.nn - self.n * self.n
        if var > 1e-9 * max(1.0, self.nn):
            slope = (self.nt - self.n * self.t) / var
            fixed = self.t - slope * self.n
            if slope > 0 and fixed >= 0:
                return fixed, slope
        return 0.0, self.t / max(self.n, 1.0)

    def seconds(self, candidates: int) -> float:
        fixed, slope = self.coefficients()
        return fixed + slope * candidates


class Admission:
    """The service-time model of one batcher and the admission rule built on it."""

    def __init__(self, budget_s: float | None = None, workers: int = 1, max_batch_candidates: int = 8192,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if budget_s is not None and budget_s <= 0:
            raise ValueError(f"the latency budget must be positive, got {budget_s}")
        self.fixed_budget_s = budget_s
        self.workers, self.max_batch = workers, max_batch_candidates
        self.model = BatchTimeModel()
        self.alone_s: float | None = None  # service time of a request that ran alone
        self._clock = clock
        self._inflight: dict[int, tuple[float, float]] = {}  # batch id -> (start, estimated duration)

    @property
    def budget_s(self) -> float:
        if self.fixed_budget_s is not None:
            return self.fixed_budget_s
        if self.alone_s is None:
            return math.inf  # nothing measured yet: the queue bound alone applies
        return max(MIN_BUDGET_S, BUDGET_FACTOR * self.alone_s)

    def seed(self, seconds: float, candidates: int) -> None:
        """Start the model from a warm-up measurement (one request of ``candidates``)."""
        self.observe(seconds, candidates, requests=1)

    def observe(self, seconds: float, candidates: int, requests: int) -> None:
        """Fold one executed batch into the model."""
        if candidates <= 0 or seconds <= 0:
            return
        self.model.observe(candidates, seconds)
        if requests == 1:
            self.alone_s = seconds if self.alone_s is None else (1 - ALPHA) * self.alone_s + ALPHA * seconds

    def started(self, batch_id: int, candidates: int) -> None:
        duration = self.model.seconds(candidates) if self.model.ready else 0.0
        self._inflight[batch_id] = (self._clock(), duration)

    def finished(self, batch_id: int) -> None:
        self._inflight.pop(batch_id, None)

    def inflight_remaining_s(self) -> float:
        now = self._clock()
        left = sum(max(0.0, dur - (now - t0)) for t0, dur in self._inflight.values())
        return left / self.workers

    def check(self, queued_candidates: int, own_candidates: int) -> Estimate:
        """Admit a request of ``own_candidates`` behind ``queued_candidates``?"""
        budget = self.budget_s
        if not self.model.ready:
            return Estimate(True, 0.0, budget)
        work = queued_candidates + own_candidates
        batches = max(1, math.ceil(work / self.max_batch))  # the queue runs as this many batches
        fixed, slope = self.model.coefficients()
        wait = self.inflight_remaining_s() + (batches * fixed + slope * work) / self.workers
        idle = queued_candidates == 0 and not self._inflight
        return Estimate(idle or wait <= budget, wait, budget)
