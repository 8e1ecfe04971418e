"""Dynamic batcher: merged calls give exactly the per-request scorer results."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from runtime.serving.batcher import (
    Batcher,
    OverloadedError,
    ShuttingDownError,
    run_batch,
    run_group_chunked,
)
from runtime.serving.cache import UserCache
from tests.serving.conftest import make_request


class CountingScorer:
    """The real scorer, with the number of rows each graph saw recorded (not mocked)."""

    def __init__(self, scorer):
        self._s = scorer
        self.user_rows: list[int] = []
        self.group_rows: list[int] = []

    def __getattr__(self, name):
        return getattr(self._s, name)

    def run_user(self, users):
        self.user_rows.append(next(iter(users.values())).shape[0])
        return self._s.run_user(users)

    def run_group(self, cands, boundary, user_index):
        self.group_rows.append(len(user_index))
        return self._s.run_group(cands, boundary, user_index)


def _requests(scorer, count, n_users):
    reqs = [make_request(i, n=1 + (i * 7) % 23, user_seed=i % n_users) for i in range(count)]
    return reqs, [scorer.prepare(u, c) for u, c in reqs]


def test_run_batch_equals_sequential_scores(scorer):
    reqs, prepared = _requests(scorer, 12, n_users=5)
    outs, info = run_batch(scorer, UserCache(1 << 20), prepared)
    assert (info.requests, info.users, info.users_computed) == (12, 5, 5)
    for (u, c), out in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(out["ctr"], scorer.score(u, c)["ctr"])


def test_group_call_in_chunks_is_exact(scorer):
    counting = CountingScorer(scorer)
    reqs, prepared = _requests(scorer, 12, n_users=5)  # 12 requests of 1..23 candidates
    outs, info = run_batch(counting, UserCache(1 << 20), prepared, group_chunk=7)
    assert counting.user_rows == [5]  # still one user call for the batch
    total = sum(p.n for p in prepared)
    assert len(counting.group_rows) == -(-total // 7) and sum(counting.group_rows) == total
    assert (
        max(counting.group_rows) <= 7 and max(counting.group_rows) - min(counting.group_rows) <= 1
    )
    for (u, c), out in zip(reqs, outs, strict=True):  # chunks cut requests: still exact
        np.testing.assert_array_equal(out["ctr"], scorer.score(u, c)["ctr"])


def test_group_chunk_off_or_larger_than_the_batch_is_one_call(scorer):
    counting = CountingScorer(scorer)
    u, c = make_request(1, 9)
    p = scorer.prepare(u, c)
    boundary = scorer.run_user(p.user)
    index = np.zeros(p.n, dtype=np.int64)
    for chunk in (0, 9, 100):
        out = run_group_chunked(counting, p.candidates, boundary, index, chunk)
        np.testing.assert_array_equal(out["ctr"], scorer.score(u, c)["ctr"])
    assert counting.group_rows == [9, 9, 9]


def test_cache_hits_skip_the_user_graph(scorer):
    counting = CountingScorer(scorer)
    cache = UserCache(1 << 20)
    reqs, prepared = _requests(scorer, 6, n_users=3)
    first, _ = run_batch(counting, cache, prepared[:3])
    again, info = run_batch(counting, cache, prepared)
    assert counting.user_rows == [3]  # the second batch found every user cached
    assert info.users_computed == 0 and cache.stats().hits == 3
    for (u, c), out in zip(reqs, again, strict=True):
        np.testing.assert_array_equal(out["ctr"], scorer.score(u, c)["ctr"])


def test_explicit_user_key_wins_over_features(scorer):
    (u1, c1), (u2, c2) = make_request(1, 4), make_request(2, 4)
    p1, p2 = scorer.prepare(u1, c1), scorer.prepare(u2, c2)
    p1.user_key = p2.user_key = "k:same-user"
    outs, info = run_batch(scorer, None, [p1, p2])
    assert info.users == 1
    np.testing.assert_array_equal(outs[1]["ctr"], scorer.score(u1, c2)["ctr"])


def test_concurrent_submits_are_merged_and_exact(scorer):
    counting = CountingScorer(scorer)
    reqs, prepared = _requests(scorer, 40, n_users=7)

    async def main():
        b = Batcher(counting, UserCache(1 << 20), max_delay_s=0.05, max_batch_candidates=10_000)
        await b.start()
        outs = await asyncio.gather(*(b.submit(p) for p in prepared))
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert len(counting.group_rows) < len(reqs)  # merged into fewer group calls
    assert sum(counting.user_rows) == 7  # each distinct user ran through the user graph once
    for (u, c), out in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(out["ctr"], scorer.score(u, c)["ctr"])


def test_max_delay_counts_from_the_oldest_request(scorer):
    # a request that has already queued max_delay_s (it arrived while a batch ran) goes at once
    ticks = itertools.chain([0.0], itertools.repeat(3600.0))  # enqueued at 0, then an hour later
    _, prepared = _requests(scorer, 1, n_users=1)

    async def main():
        b = Batcher(scorer, None, max_delay_s=600.0, clock=lambda: next(ticks))
        await b.start()
        out = await asyncio.wait_for(b.submit(prepared[0]), timeout=60)  # not the 600 s delay
        await b.close()
        return out

    out = asyncio.run(main())
    assert out["ctr"].shape == (prepared[0].n,)


def test_max_batch_candidates_bounds_every_group_call(scorer):
    counting = CountingScorer(scorer)
    reqs, prepared = _requests(scorer, 30, n_users=30)

    async def main():
        b = Batcher(counting, None, max_delay_s=0.05, max_batch_candidates=40)
        await b.start()
        outs = await asyncio.gather(*(b.submit(p) for p in prepared))
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert max(counting.group_rows) <= 40
    for (u, c), out in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(out["ctr"], scorer.score(u, c)["ctr"])


def test_full_queue_is_refused_and_close_drains(scorer):
    _, prepared = _requests(scorer, 6, n_users=6)

    async def main():
        b = Batcher(scorer, None, max_queue=2, max_delay_s=0.2)
        await b.start()
        accepted = [asyncio.ensure_future(b.submit(p)) for p in prepared[:2]]
        await asyncio.sleep(0)  # both are queued; the collector is waiting for more
        with pytest.raises(OverloadedError, match="overloaded"):
            await b.submit(prepared[2])
        await b.close()  # drains the two accepted requests
        with pytest.raises(ShuttingDownError):
            await b.submit(prepared[3])
        return [a.result() for a in accepted]

    outs = asyncio.run(main())
    assert [o["ctr"].shape for o in outs] == [(p.n,) for p in prepared[:2]]


def test_non_split_scorer_batches_without_cache(split_bundle):
    import runtime

    full = runtime.load(split_bundle, "onnxruntime", use_split=False)
    cache = UserCache(1 << 20)
    reqs, prepared = _requests(full, 5, n_users=2)
    outs, _ = run_batch(full, cache, prepared)
    assert cache.stats().entries == 0
    for (u, c), out in zip(reqs, outs, strict=True):
        np.testing.assert_array_equal(out["ctr"], full.score(u, c)["ctr"])
