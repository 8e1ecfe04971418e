"""The dynamic batcher: concurrent requests merged into one user call and one group call.

Requests wait in a bounded queue. A collector task takes the first waiting request,
waits until it has been queued ``max_delay_s`` for more to join (or until
``max_batch_candidates`` are queued), and hands the batch to a worker thread, which

1. keys every request's user (explicit key, else a hash of the features) and
   deduplicates: M distinct users;
2. looks each user up in the cache; only the misses go through the user graph, in
   ONE call, and their boundary rows are cached;
3. runs the group graph on all candidates with ``user_index`` mapping each
   candidate to its user's boundary row: once, or in equal chunks of at most
   ``group_chunk`` candidates (on CPU a group call of thousands of candidates costs
   more per candidate than a few hundred: its activations no longer stay in cache);
4. cuts the outputs back into per-request pieces.

A request-scoped bundle (its group or full graph mixes the rows of a call, e.g. a softmax
over the request's candidates; ``manifest.row_scope``) keeps steps 1-2 (user-side work is
still batched and cached) but runs step 3 once per request, never cut into chunks: a
request's scores never depend on which other requests shared its batch.

The default ``max_delay_s`` is 0: continuous batching. A batch is whatever queued while
the previous one ran, so an idle server answers a lone request at once and a busy one
batches as deeply as its load (bench RankMixer, 2-core CPU: +8-12% candidates/s against a
2 ms delay at concurrency 1-16). A delay pays off where one big call costs about what a
small one does (GPUs): set ``--max-delay-ms`` there.

A full queue is refused at once (``OverloadedError`` -> HTTP 429) instead of letting
latency and memory grow, and so is a request whose estimated completion exceeds the
latency budget (``admission.Admission``: admission by deadline); ``close()`` drains what
was accepted before it stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import TierUnavailableError, UgsepError
from runtime.scorer import Prepared, Scorer, split_outputs
from runtime.serving.admission import Admission, Estimate
from runtime.serving.cache import UserCache, user_feature_key

log = logging.getLogger(__name__)


class OverloadedError(UgsepError):
    """The queue is full or the latency budget is spent: back off and retry (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDownError(UgsepError):
    """The batcher is closed or draining and accepts no new requests (HTTP 503)."""


@dataclass
class BatchInfo:
    """What one backend batch did (for metrics)."""

    requests: int
    users: int  # distinct users in the batch (M of the group call)
    users_computed: int  # of which went through the user graph (cache misses)
    candidates: int
    queue_seconds: list[float] = field(default_factory=list)
    run_seconds: float = 0.0
    user_seconds: float = 0.0  # cache lookups + the user graph (0 on an unsplit bundle)
    group_seconds: float = 0.0  # the group graph(s), or the full graph on an unsplit bundle


@dataclass
class _Pending:
    prepared: Prepared
    future: asyncio.Future
    enqueued: float


def run_batch(scorer: Scorer, cache: UserCache | None, prepared: Sequence[Prepared], group_chunk: int = 0):
    """Score validated requests with one user call (deduplicated misses) and one group call.

    ``group_chunk > 0`` runs the group call in equal chunks of at most that many candidates.
    Returns (per-request outputs, BatchInfo). Synchronous: called on a worker thread.
    """
    t0 = time.perf_counter()
    outputs, info, t_user = _run_batch(scorer, cache, prepared, group_chunk)
    info.user_seconds = t_user - t0 if t_user else 0.0
    info.group_seconds = time.perf_counter() - (t_user or t0)
    return outputs, info


def _run_batch(scorer, cache, prepared, group_chunk):
    """``run_batch``'s work; also returns the perf_counter() when the user side ended (None: unsplit)."""
    counts = [p.n for p in prepared]
    if not scorer.split and scorer.request_scoped:
        n = len(prepared)
        return scorer.run_per_request(prepared, None), BatchInfo(n, n, n, sum(counts)), None
    cands = {k: np.concatenate([p.candidates[k] for p in prepared]) for k in prepared[0].candidates}
    if not scorer.split:  # the cache is a no-op: the full graph has no user-side result
        users = {k: np.concatenate([p.user[k] for p in prepared]) for k in prepared[0].user}
        index = np.repeat(np.arange(len(prepared), dtype=np.int64), counts)
        out = scorer.run_full(users, cands, index)
        return split_outputs(out, counts), BatchInfo(len(prepared), len(prepared), len(prepared), sum(counts)), None
    keys = [p.user_key or user_feature_key(p.user) for p in prepared]
    slot: dict[str, int] = {}
    first: dict[str, Prepared] = {}
    for k, p in zip(keys, prepared, strict=True):
        if k not in slot:
            slot[k], first[k] = len(slot), p
    rows = {k: cache.get(k) for k in slot} if cache is not None and cache.enabled else {k: None for k in slot}
    missing = [k for k, r in rows.items() if r is None]
    if missing:
        users = {n: np.concatenate([first[k].user[n] for k in missing]) for n in prepared[0].user}
        computed = scorer.run_user(users)
        for j, k in enumerate(missing):
            rows[k] = {n: v[j : j + 1] for n, v in computed.items()}
            if cache is not None and cache.enabled:
                cache.put(k, rows[k])
    boundary = {n: np.concatenate([rows[k][n] for k in slot]) for n in scorer.boundary_names}
    info = BatchInfo(len(prepared), len(slot), len(missing), sum(counts))
    t_user = time.perf_counter()
    if scorer.request_scoped:  # one group call per request, whole
        return scorer.run_per_request(prepared, boundary, [slot[k] for k in keys]), info, t_user
    index = np.repeat(np.array([slot[k] for k in keys], dtype=np.int64), counts)
    out = run_group_chunked(scorer, cands, boundary, index, group_chunk)
    return split_outputs(out, counts), info, t_user


def run_group_chunked(scorer: Scorer, cands: dict, boundary: dict, index: np.ndarray, chunk: int) -> dict:
    """The group graph on N candidates as ceil(N / chunk) calls of equal size (one call if chunk <= 0).

    Exact for a row-wise group graph (``manifest.row_scope``; request-scoped bundles never
    come here), as every call gets all M boundary rows: any cut gives the same rows.
    """
    n = len(index)
    if chunk <= 0 or n <= chunk:
        return scorer.run_group(cands, boundary, index)
    parts = -(-n // chunk)
    bounds = [round(i * n / parts) for i in range(parts + 1)]  # equal sizes: no tiny last call
    outs = [
        scorer.run_group({k: v[a:b] for k, v in cands.items()}, boundary, index[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


class Batcher:
    """Async front of ``run_batch``: bounded queue, maximum delay, maximum batch.

    Create it, ``await start()`` inside the event loop, ``await submit(prepared)`` per
    request, and ``await close()`` to drain. ``on_batch`` (called on the event loop)
    receives a ``BatchInfo`` per executed batch. ``group_chunk``: see ``run_batch``.
    ``clock`` (seconds) is for tests.
    """

    def __init__(
        self,
        scorer: Scorer,
        cache: UserCache | None = None,
        *,
        max_queue: int = 512,
        max_delay_s: float = 0.0,
        max_batch_candidates: int = 8192,
        workers: int = 1,
        on_batch: Callable[[BatchInfo], None] | None = None,
        group_chunk: int = 0,
        clock: Callable[[], float] = time.perf_counter,
        admission: Admission | None = None,
    ) -> None:
        if max_queue < 1 or max_delay_s < 0 or max_batch_candidates < 1 or workers < 1:
            raise ValueError("Batcher needs max_queue >= 1, max_delay_s >= 0, max_batch_candidates >= 1, workers >= 1")
        self.scorer, self.cache = scorer, cache
        self.max_queue, self.max_delay_s = max_queue, max_delay_s
        self.max_batch_candidates = max_batch_candidates
        self.max_users = scorer.manifest.limits.max_users_per_call
        self.workers, self.on_batch = workers, on_batch
        self.group_chunk = group_chunk
        self._clock = clock
        self.admission = admission or Admission(None, workers, max_batch_candidates, clock)
        self._queue: deque[_Pending] = deque()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"ugsep-{scorer.name}")
        self._inflight: set[asyncio.Task] = set()
        self._closing = False
        self._collector: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        """Start the collector task on the running loop."""
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def submit(self, prepared: Prepared) -> dict[str, np.ndarray]:
        """Queue one validated request and wait for its outputs."""
        if self._closing or self._collector is None:
            raise ShuttingDownError(f"model '{self.scorer.name}' is not accepting requests (shutting down)")
        if len(self._queue) >= self.max_queue:
            raise OverloadedError(
                f"model '{self.scorer.name}' is overloaded: {len(self._queue)} requests are queued "
                f"(limit {self.max_queue}); retry later"
            )
        self.admit(prepared.n)
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(prepared, fut, self._clock()))
        self._wakeup.set()
        return await fut

    def estimate(self, candidates: int) -> Estimate:
        """Estimated completion of a request of ``candidates`` if it were queued now."""
        return self.admission.check(self._queued_candidates(), candidates)

    def admit(self, candidates: int) -> None:
        """Raise ``OverloadedError`` when a request of ``candidates`` would miss the budget."""
        est = self.estimate(candidates)
        if not est.admitted:
            raise OverloadedError(
                f"model '{self.scorer.name}' is overloaded: a request of {candidates} candidates would "
                f"take ~{est.wait_s * 1000:.0f} ms, over the latency budget of {est.budget_s * 1000:.0f} ms; "
                f"retry later", est.retry_after_s,
            )

    async def close(self) -> None:
        """Refuse new requests, finish every accepted one, then stop the worker threads."""
        self._closing = True
        if self._collector is not None:
            self._wakeup.set()
            await self._collector
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def _collect(self) -> None:
        while True:
            await self._slots.acquire()
            while not self._queue:
                if self._closing:
                    self._slots.release()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_for_more()
            task = asyncio.get_running_loop().create_task(self._dispatch(self._take()))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _wait_for_more(self) -> None:
        """Wait for more requests until the oldest has queued max_delay_s (not when draining).

        The delay counts from the oldest request's arrival, not from now: requests that queued
        while the previous batch ran have waited already and go at once, so the worker does not
        sit idle for max_delay_s before every batch under load.
        """
        deadline = self._queue[0].enqueued + self.max_delay_s
        while not self._closing and self._queued_candidates() < self.max_batch_candidates:
            remaining = deadline - self._clock()
            if remaining <= 0 or len(self._queue) >= self.max_users:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _queued_candidates(self) -> int:
        return sum(p.prepared.n for p in self._queue)

    def _take(self) -> list[_Pending]:
        batch = [self._queue.popleft()]
        total = batch[0].prepared.n
        while self._queue and len(batch) < self.max_users:
            n = self._queue[0].prepared.n
            if total + n > self.max_batch_candidates:
                break
            batch.append(self._queue.popleft())
            total += n
        return batch

    async def _one_by_one(self, loop, live: list[_Pending]) -> None:
        """After the embedding tier failed a merged batch: each request alone, so those whose
        rows are in the hot cache or on live nodes still succeed (none fails for a neighbour)."""
        for p in live:
            try:
                out, _ = await loop.run_in_executor(
                    self._executor, run_batch, self.scorer, self.cache, [p.prepared], self.group_chunk
                )
            except Exception as e:  # noqa: BLE001 - this request's own error (503 for the tier)
                if not p.future.done():
                    p.future.set_exception(e)
            else:
                if not p.future.done():
                    p.future.set_result(out[0])

    async def _dispatch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        start = self._clock()
        try:
            live = [p for p in batch if not p.future.cancelled()]  # clients that went away
            if not live:
                return
            self.admission.started(id(batch), sum(p.prepared.n for p in live))
            try:
                outputs, info = await loop.run_in_executor(
                    self._executor, run_batch, self.scorer, self.cache, [p.prepared for p in live], self.group_chunk
                )
            except TierUnavailableError:
                if len(live) == 1:
                    raise
                await self._one_by_one(loop, live)
                return
            info.queue_seconds = [start - p.enqueued for p in live]
            info.run_seconds = self._clock() - start
            self.admission.observe(info.run_seconds, info.candidates, info.requests)
            for p, out in zip(live, outputs, strict=True):
                if not p.future.done():
                    p.future.set_result(out)
            if self.on_batch is not None:
                self.on_batch(info)
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error
            log.exception("batch of %d requests failed on model '%s'", len(batch), self.scorer.name)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
        finally:
            self.admission.finished(id(batch))
            self._slots.release()
