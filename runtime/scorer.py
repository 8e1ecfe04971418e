"""The scorer: one user and N candidates in, N scores out, on the split or full graphs."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.bundle import Bundle
from runtime.embstore import StoreFeeds
from runtime.errors import InternalError, RequestError
from runtime.manifest import SMALL_GROUP
from runtime.validate import check_candidates, check_user

log = logging.getLogger(__name__)
USER_INDEX = "user_index"


@dataclass
class Prepared:
    """A validated request: user feeds [1, ...] (mixed inputs: first row), candidate feeds [N, ...]."""

    user: dict[str, np.ndarray]
    candidates: dict[str, np.ndarray]
    n: int
    user_key: str | None = None


class Scorer:
    """Scores requests against a loaded bundle with one backend.

    On a split bundle every call runs the user graph once per distinct user and the
    group graph once for all candidates (``user_index`` maps candidates to users);
    otherwise ``full.onnx`` runs on user rows repeated per candidate.

    A bundle with a ``group_small`` stage (a group graph tuned at batch 1, e.g. with more
    layers as int8 MatMulNBits) runs it for group calls of at most its ``max_rows``
    candidates, on CPU backends (it was timed on a CPU); ``group_variant`` forces one graph
    ("group" or "group_small", as parity does) instead of choosing by size ("auto").
    ``stage_runs`` counts the graph runs per stage.

    A *request-scoped* bundle (``manifest.row_scope``: its group or full graph mixes the
    rows of a call, e.g. a softmax over the candidates) never shares a group or full call
    between requests: ``score_many`` runs the user graph once for all requests and the
    group graph once per request (``request_scoped``).
    """

    def __init__(
        self, bundle: Bundle, backend, *, use_split: bool = True, group_variant: str = "auto",
        embeddings=None,
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.spec = bundle.manifest.spec
        self.backend = backend
        self.split = use_split and self.manifest.is_split
        self.request_scoped = self.manifest.mixes_rows("group" if self.split else "full")
        self.max_candidates = self.manifest.limits.max_candidates
        self.output_names = list(self.spec.outputs)
        if group_variant not in ("auto", "group", SMALL_GROUP):
            raise InternalError(f"group_variant {group_variant!r} is not auto, group or {SMALL_GROUP}")
        self.small_rows = 0  # group calls of at most this many candidates run group_small
        self.stage_runs: Counter[str] = Counter()
        # embedding lookups outside the graphs: the bundle's store, or ``embeddings`` (an
        # EmbeddingStore such as the Redis tier's RedisStore) in its place
        self.store = StoreFeeds.for_bundle(bundle, embeddings)
        if self.split:
            self.user_session = backend.open(bundle, "user")
            self.group_session = backend.open(bundle, "group")
            self.boundary_names = [b.name for b in self.manifest.split.boundary]
            rows = self.manifest.small_group_rows
            if group_variant == SMALL_GROUP:
                if not rows:
                    raise InternalError(f"bundle '{bundle.root}' has no {SMALL_GROUP} stage")
                rows = sys.maxsize  # every group call
            elif group_variant == "group" or backend.needs_gpu:
                rows = 0  # tuned on a CPU: GPU backends run the group graph
            if rows:
                self.small_session = backend.open(bundle, SMALL_GROUP)
                self.small_rows = rows
        else:
            self.full_session = backend.open(bundle, "full")
            self.boundary_names = []

    @property
    def name(self) -> str:
        return self.manifest.model_name

    # -- request level ---------------------------------------------------------------
    def prepare(self, user: Mapping[str, Any], candidates: Mapping[str, Any]) -> Prepared:
        """Validate one request against the spec (RequestError on any problem)."""
        u = check_user(self.spec, user)
        c, n = check_candidates(self.spec, candidates, self.max_candidates)
        for s in self.spec.inputs:
            if s.side == "mixed":  # the user graph reads a mixed input's first row
                u[s.name] = c[s.name][:1]
        if self.store is not None:  # ids outside a table: this request's error, not a batch's
            self.store.check(u, "user")
            self.store.check(c, "group")
        return Prepared(u, c, n)

    def score(self, user: Mapping[str, Any], candidates: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Score one request: returns {output name: array [N, ...]}."""
        return self.score_many([(user, candidates)])[0]

    def score_many(
        self, requests: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]
    ) -> list[dict[str, np.ndarray]]:
        """Score several requests with one user call and one group call (request-scoped
        bundles: one group call per request)."""
        if not requests:
            raise RequestError("score_many needs at least one request")
        return self.run_prepared([self.prepare(u, c) for u, c in requests])

    def run_prepared(self, prepared: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        if len(prepared) == 1:  # one request: nothing to concatenate or cut back
            p = prepared[0]
            return [self.run_batch(p.user, p.candidates, np.zeros(p.n, dtype=np.int64))]
        users = {k: np.concatenate([p.user[k] for p in prepared]) for k in prepared[0].user}
        if self.request_scoped:  # the user side still runs once for every request's user
            return self.run_per_request(prepared, self.run_user(users) if self.split else None)
        cands = {k: np.concatenate([p.candidates[k] for p in prepared]) for k in prepared[0].candidates}
        counts = [p.n for p in prepared]
        user_index = np.repeat(np.arange(len(prepared), dtype=np.int64), counts)
        out = self.run_batch(users, cands, user_index)
        return split_outputs(out, counts)

    def run_per_request(
        self, prepared: Sequence[Prepared], boundary: dict[str, np.ndarray] | None, slots=None
    ) -> list[dict[str, np.ndarray]]:
        """One group (or full) call per request, as a request-scoped bundle needs."""
        return run_per_request(self, prepared, boundary, slots)

    # -- batch level (used by the batcher and the cache) --------------------------------
    def run_batch(
        self, users: dict[str, np.ndarray], cands: dict[str, np.ndarray], user_index: np.ndarray
    ) -> dict[str, np.ndarray]:
        """M users and N candidates (already validated) -> outputs [N, ...]."""
        if self.split:
            return self.run_group(cands, self.run_user(users), user_index)
        return self.run_full(users, cands, user_index)

    def run_user(self, users: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """User graph on M users -> boundary tensors [M, ...] (split bundles only)."""
        if not self.split:
            raise InternalError("run_user called on a scorer without a split")
        users = self.lookup(users, "user")
        out = self.user_session.run({k: users[k] for k in self.user_session.input_names})
        self.stage_runs["user"] += 1
        return {k: out[k] for k in self.boundary_names}

    def run_group(
        self, cands: dict[str, np.ndarray], boundary: dict[str, np.ndarray], user_index: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Group graph on N candidates + boundary tensors [M, ...] -> outputs [N, ...]."""
        cands = self.lookup(cands, "group")
        feeds = {**cands, **boundary, USER_INDEX: np.ascontiguousarray(user_index, dtype=np.int64)}
        stage = SMALL_GROUP if len(feeds[USER_INDEX]) <= self.small_rows else "group"
        session = self.small_session if stage == SMALL_GROUP else self.group_session
        out = session.run({k: feeds[k] for k in session.input_names})
        self.stage_runs[stage] += 1
        return {k: out[k] for k in self.output_names}

    def lookup(self, inputs: dict[str, np.ndarray], side: str) -> dict[str, np.ndarray]:
        """``inputs`` plus the store's rows for the lookups of ``side`` (no store: unchanged)."""
        return inputs if self.store is None else self.store.feeds(inputs, side)

    def run_full(
        self, users: dict[str, np.ndarray], cands: dict[str, np.ndarray], user_index: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Monolithic graph: user rows gathered per candidate."""
        users = self.lookup(users, "user")  # once per user, then gathered per candidate
        feeds = {k: np.ascontiguousarray(v[user_index]) for k, v in users.items()}
        feeds.update(self.lookup(cands, "group"))  # mixed inputs come whole from the candidates
        out = self.full_session.run({k: feeds[k] for k in self.full_session.input_names})
        self.stage_runs["full"] += 1
        return {k: out[k] for k in self.output_names}


def run_per_request(
    stages, prepared: Sequence[Prepared], boundary: dict[str, np.ndarray] | None, slots=None
) -> list[dict[str, np.ndarray]]:
    """One group (or full) call per request on ``stages`` (a Scorer, or the Triton BLS
    stages: anything with ``run_group`` / ``run_full``), as a request-scoped bundle needs.

    ``boundary``: the user graph's rows for the requests' users (split only), row
    ``slots[i]`` (default i) belonging to request i."""
    out = []
    for i, p in enumerate(prepared):
        index = np.zeros(p.n, dtype=np.int64)
        if boundary is None:
            out.append(stages.run_full(p.user, p.candidates, index))
            continue
        s = i if slots is None else slots[i]
        row = {k: v[s : s + 1] for k, v in boundary.items()}
        out.append(stages.run_group(p.candidates, row, index))
    return out


def split_outputs(out: dict[str, np.ndarray], counts: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut batched outputs [sum(counts), ...] back into per-request dicts."""
    bounds = np.cumsum(counts)[:-1]
    parts = {k: np.split(v, bounds) for k, v in out.items()}
    return [{k: parts[k][i] for k in out} for i in range(len(counts))]
