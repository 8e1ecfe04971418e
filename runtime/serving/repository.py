"""Served models: load, warm up, and swap bundle versions atomically.

Each ``ServedModel`` is one loaded version of one bundle: a scorer, its user cache and
its batcher. A reload opens and verifies the new version (``Bundle.open`` checks every
sha256, parity is checked as at startup), warms it up with a sample request, starts its
batcher, then replaces the old entry in one assignment; the old version drains its
accepted requests before its batcher stops. Requests that reach a draining batcher
are retried on the current version, so a reload fails no request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import runtime
from runtime.errors import BundleError, RequestError
from runtime.sample import sample_requests
from runtime.scorer import Prepared, Scorer
from runtime.serving.admission import Admission
from runtime.serving.batcher import Batcher
from runtime.serving.cache import UserCache
from runtime.serving.protocol import kserve_datatype

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """Everything ``serve`` can be told (the CLI flags map one to one)."""

    backend: str = "onnxruntime"
    allow_unverified: bool = False
    use_split: bool = True
    intra_op_threads: int | None = None
    thread_pool: str = "session"  # ORT: "process" shares one spinning pool (runtime/backends/ort.py)
    cache_bytes: int = 64 << 20
    cache_ttl_s: float = 300.0
    max_queue: int = 512
    max_delay_ms: float = 0.0  # continuous batching: a batch is what queued while the last ran
    max_batch_candidates: int = 8192
    group_chunk_candidates: int | None = None  # None: the backend's default (256 on ORT CPU, 0 = one call)
    workers: int = 1
    max_candidates: int | None = None  # None: the bundle's manifest.limits.max_candidates
    max_body_bytes: int = 8 << 20
    token: str | None = None
    # hardening (issue 18): see app.py, intake.py, admission.py, control.py
    max_json_bytes: int = 1 << 20  # the JSON part of a request; big tensors go binary
    body_timeout_s: float = 15.0  # a request body must arrive within this (else 408)
    max_inflight_body_bytes: int | None = None  # bodies being read at once (None: 8 x max_body_bytes)
    latency_budget_ms: float | None = None  # None: derived from the measured service time
    enable_model_control: bool = False  # the repository load/unload endpoints
    model_root: str | None = None  # load only bundles under this directory
    control_token: str | None = None  # bearer token for load/unload (else the server token)
    verify: Any = None  # a BundleKey (runtime/signing.py): every loaded bundle must carry its signature
    allow_extra_files: bool = False  # ignore files a bundle's manifest does not list (warning)
    embeddings: Any = None  # None: the bundle's own store; a redis:// URL or TierConfig: that tier
    embeddings_cache_bytes: int = 64 << 20  # the tier's hot-row cache
    grpc_port: int | None = None  # KServe v2 gRPC beside HTTP (None: off; 0: any free port)
    grpc_host: str = "127.0.0.1"
    grpc_grace_s: float = 10.0  # in-flight RPCs finish within this on shutdown
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServedModel:
    """One loaded version of a bundle."""

    name: str
    version: str
    path: Path
    scorer: Scorer
    cache: UserCache
    outputs: dict[str, tuple[str, list[int]]]  # name -> (KServe datatype, shape)
    batcher: Batcher | None = None
    warmup: list[tuple[float, int]] = field(default_factory=list)  # (seconds, candidates): seeds admission

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata: -1 marks the dynamic candidate dimension."""
        spec = self.scorer.spec
        inputs = [
            {"name": s.name, "datatype": kserve_datatype(s.dtype),
             "shape": [1 if s.side == "user" else -1, *s.shape]}
            for s in spec.inputs
        ]
        outputs = [
            {"name": n, "datatype": dt, "shape": shape} for n, (dt, shape) in self.outputs.items()
        ]
        return {
            "name": self.name, "versions": [self.version], "platform": f"ugsep_{self.scorer.backend.name}",
            "inputs": inputs, "outputs": outputs,
            "parameters": {"split": self.scorer.split, "max_candidates": self.scorer.max_candidates,
                           "precision": self.scorer.manifest.precision},
        }

    def prepare(self, user: dict, candidates: dict, user_key: str | None) -> Prepared:
        p = self.scorer.prepare(user, candidates)
        p.user_key = user_key
        return p


def load_model(path: str | Path, options: ServeOptions, version: str = "1") -> ServedModel:
    """Open, verify, warm up (blocking): the model is ready to serve when this returns."""
    backend_opts = {"intra_op_threads": options.intra_op_threads} if options.intra_op_threads else {}
    if options.thread_pool != "session":
        backend_opts["thread_pool"] = options.thread_pool
    scorer = runtime.load(
        path, options.backend, allow_unverified=options.allow_unverified,
        use_split=options.use_split, verify=options.verify,
        allow_extra_files=options.allow_extra_files,
        embeddings=options.embeddings,
        embeddings_cache_bytes=options.embeddings_cache_bytes, **backend_opts,
    )
    if options.max_candidates is not None:
        scorer.max_candidates = int(options.max_candidates)
    rows, _ = sample_requests(scorer.spec, 1, 2, seed=0)
    user = {s.name: rows[s.name][:1] for s in scorer.spec.user_inputs}
    out = scorer.score(user, {s.name: rows[s.name] for s in scorer.spec.group_inputs})
    warmup = _timed_warmup(scorer)
    outputs = {k: (kserve_datatype(v.dtype), [-1, *v.shape[1:]]) for k, v in out.items()}
    cache = UserCache(options.cache_bytes if scorer.split else 0, options.cache_ttl_s)
    return ServedModel(scorer.name, version, Path(path), scorer, cache, outputs, warmup=warmup)


def _timed_warmup(scorer: Scorer) -> list[tuple[float, int]]:
    """(seconds, candidates) of warm requests of two sizes: the admission model's first line."""
    points = []
    for n in sorted({1, min(64, scorer.max_candidates)}):
        rows, _ = sample_requests(scorer.spec, 1, n, seed=1)
        user = {s.name: rows[s.name][:1] for s in scorer.spec.user_inputs}
        cands = {s.name: rows[s.name] for s in scorer.spec.group_inputs}
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            scorer.score(user, cands)
            best = min(best, time.perf_counter() - t0)
        points.append((best, n))
    return points


def content_digest(model: ServedModel) -> str:
    """The bundle's files and their sha256s (from the verified manifest): equal digests, same model."""
    files = model.scorer.manifest.files
    return hashlib.sha256(repr(sorted((k, v.sha256) for k, v in files.items())).encode()).hexdigest()


def _group_chunk(options: ServeOptions, scorer: Scorer) -> int:
    if options.group_chunk_candidates is not None:
        return int(options.group_chunk_candidates)
    return int(scorer.backend.group_chunk_candidates)


class ModelRepository:
    """The models a server holds, by name; reloads swap versions atomically."""

    def __init__(self, options: ServeOptions, on_batch=None) -> None:
        self.options = options
        self.models: dict[str, ServedModel] = {}
        self.on_batch = on_batch
        self._reload_lock: asyncio.Lock | None = None
        self._generation: dict[str, int] = {}
        self.unloaded: dict[str, Path] = {}  # name -> bundle path, for a later load without one
        self._digest: dict[str, tuple[str, str]] = {}  # name -> (content digest, version) last loaded

    def add(self, model: ServedModel) -> None:
        if model.name in self.models:
            raise BundleError(
                f"two bundles are named '{model.name}' ({self.models[model.name].path} and "
                f"{model.path}); model names must be unique"
            )
        self.models[model.name] = model
        self._generation[model.name] = int(model.version)
        self._digest[model.name] = (content_digest(model), model.version)

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    async def start(self) -> None:
        self._reload_lock = asyncio.Lock()
        for m in self.models.values():
            await self._start(m)

    async def _start(self, m: ServedModel) -> None:
        o = self.options
        max_batch = max(o.max_batch_candidates, m.scorer.max_candidates)
        admission = Admission(o.latency_budget_ms / 1000 if o.latency_budget_ms else None, o.workers, max_batch)
        for seconds, n in m.warmup:
            admission.seed(seconds, n)
        m.batcher = Batcher(
            m.scorer, m.cache, max_queue=o.max_queue, max_delay_s=o.max_delay_ms / 1000,
            max_batch_candidates=max_batch, workers=o.workers,
            group_chunk=_group_chunk(o, m.scorer),
            on_batch=(lambda info, name=m.name: self.on_batch(name, info)) if self.on_batch else None,
            admission=admission,
        )
        await m.batcher.start()

    async def reload(self, name: str, path: str | Path | None = None) -> ServedModel:
        """Load a new version of ``name`` (from ``path`` or its current path) and swap it in."""
        old = self.models.get(name)
        path = path or (old.path if old is not None else self.unloaded.get(name))
        if path is None:
            raise RequestError(f"model '{name}' is not loaded; give a bundle path to load it")
        async with self._reload_lock:
            version = str(self._generation.get(name, 0) + 1)
            new = await asyncio.to_thread(load_model, path, self.options, version)
            if new.name != name:
                raise RequestError(f"bundle '{path}' holds model '{new.name}', not '{name}'")
            digest, last_version = self._digest.get(name, (None, None))
            if content_digest(new) == digest:
                new.version = last_version  # same files: same version, so pinned clients keep working
            await self._start(new)
            self.unloaded.pop(name, None)
            self.models[name] = new  # the atomic swap: new requests go to the new version
            self._generation[name] = max(int(new.version), self._generation.get(name, 0))
            self._digest[name] = (content_digest(new), new.version)
            log.info("model '%s' version %s loaded from %s", name, new.version, new.path)
        if old is not None:
            await old.batcher.close()
        return new

    async def unload(self, name: str) -> bool:
        """Stop serving ``name`` (its accepted requests finish); False when it is not loaded."""
        async with self._reload_lock:
            model = self.models.pop(name, None)
            if model is None:
                return False
            self.unloaded[name] = model.path  # a later load without a path reloads it
        log.info("model '%s' version %s unloaded", name, model.version)
        await model.batcher.close()
        return True

    async def close(self) -> None:
        """Drain every model's batcher (accepted requests finish)."""
        await asyncio.gather(*(m.batcher.close() for m in self.models.values() if m.batcher))

    def cache_stats(self):
        return [(n, m.cache.stats()) for n, m in list(self.models.items())]

    def graph_runs(self):
        return [(n, dict(m.scorer.stage_runs)) for n, m in list(self.models.items())]
