"""The HTTP app: KServe v2 / Open Inference Protocol routes, metrics, reload, auth.

    GET  /v2/health/live, /v2/health/ready          (never need the token)
    GET  /v2                                        server metadata
    GET  /v2/models/{name}[/versions/{v}]           model metadata from the spec
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer     JSON and binary tensors
    POST /v2/repository/index                       loaded models
    POST /v2/repository/models/{name}/load          reload in place; optional body
                                                    {"parameters": {"bundle": "/new/path"}}
    POST /v2/repository/models/{name}/unload        stop serving it (in-flight requests finish)
    GET  /v2/models/{name}[/versions/{v}]/config, /v2/models[/{name}]/stats   protocol_routes.py
    GET  /metrics                                   Prometheus text format

Errors are ``{"error": message}`` with 400 (malformed request), 401 (token), 404
(model), 413 (body too large), 429 (queue full), 503 (draining; the embedding tier
unavailable or not holding the bundle's version, naming it), 500 (a bug).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from runtime.errors import BundleError, RequestError, TierUnavailableError, UgsepError
from runtime.serving.batcher import OverloadedError, ShuttingDownError
from runtime.serving.cache import explicit_user_key
from runtime.serving.compression import add_compression
from runtime.serving.metrics import CONTENT_TYPE, ServingMetrics
from runtime.serving.pending import PendingLoads
from runtime.serving.protocol import HEADER_LENGTH, InferRequest, encode_response, parse_infer
from runtime.serving.protocol_routes import add_protocol_routes
from runtime.serving.repository import ModelRepository, ServedModel, ServeOptions, load_model
from runtime.serving.tier_metrics import TierCollector, tier_stats

log = logging.getLogger(__name__)
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")


class HttpError(UgsepError):
    """An error with its HTTP status and metrics reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def build_app(bundles: Sequence[str | Path], options: ServeOptions | None = None, **overrides) -> FastAPI:
    """Load and verify every bundle (blocking), and return the ASGI app that serves them."""
    options = options or ServeOptions()
    for k, v in overrides.items():
        if not hasattr(options, k):
            raise TypeError(f"unknown serve option '{k}'")
        setattr(options, k, v)
    if not bundles:
        raise BundleError("serve needs at least one bundle")
    repo = ModelRepository(options)
    metrics = ServingMetrics(repo.cache_stats, repo.graph_runs)
    repo.on_batch = metrics.observe_batch
    metrics.registry.register(TierCollector(lambda: tier_stats(repo)))
    pending = PendingLoads()
    for path in bundles:
        try:
            repo.add(load_model(path, options))
        except TierUnavailableError as e:  # the tier lacks the pinned version: load it later
            if not options.embeddings:
                raise
            pending.add(path, e)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await repo.start()
        pending.start(repo, load_model)
        grpc_frontend = None
        try:
            if options.grpc_port is not None:
                grpc_frontend = await _start_grpc(app)
            app.state.ready = True
            yield
        finally:
            app.state.ready = False  # readiness fails first, then accepted requests drain
            await pending.stop()
            if grpc_frontend is not None:
                await grpc_frontend.stop(options.grpc_grace_s)
            await repo.close()

    app = FastAPI(title="ugsep", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.repo, app.state.metrics, app.state.options, app.state.ready = repo, metrics, options, False
    app.state.pending = pending
    _add_auth(app, options.token)
    add_compression(app, options.max_body_bytes)
    add_protocol_routes(app, repo, metrics, options)  # before /v2/models/{name}: /v2/models/stats
    _add_health_routes(app, repo, pending)
    _add_infer_route(app, repo, metrics, options, pending)
    _add_admin_routes(app, repo, metrics)
    return app


async def _start_grpc(app: FastAPI):
    """The KServe v2 gRPC server in this event loop, on the same repository (runtime/serving/grpc_server.py)."""
    from runtime.serving.grpc_server import GrpcFrontend

    s = app.state
    frontend = GrpcFrontend(s.repo, s.metrics, s.options, lambda: bool(app.state.ready))
    s.grpc_port = await frontend.start(s.options.grpc_host, s.options.grpc_port)
    return frontend


def _add_auth(app: FastAPI, token: str | None) -> None:
    if token:
        app.add_middleware(BearerAuth, token=token)


class BearerAuth:
    """Pure ASGI middleware: every path but the health probes needs ``Authorization: Bearer``."""

    def __init__(self, app, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                response = JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _model(repo: ModelRepository, name: str) -> ServedModel:
    m = repo.get(name)
    if m is None:
        raise HttpError(404, "not_found", f"model '{name}' is not loaded; loaded models: {sorted(repo.models)}")
    return m


def resolve(repo: ModelRepository, name: str, version: str | None = None) -> ServedModel:
    """The loaded model ``name``: 404 for an unknown model, or a ``version`` that is not the loaded one."""
    model = _model(repo, name)
    if version is not None and version != model.version:
        raise HttpError(404, "not_found", f"model '{name}' version {version} is not loaded (loaded: {model.version})")
    return model


def _add_health_routes(app: FastAPI, repo: ModelRepository, pending: PendingLoads) -> None:
    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if app.state.ready and not pending.waiting else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "ugsep", "version": "1", "extensions": ["binary_tensor_data", "model_repository", "statistics"]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        try:
            return resolve(repo, name, version).metadata()
        except HttpError as e:
            return _error(e.status, str(e))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        m = repo.get(name)
        if m is None and pending.message(name):
            return _error(503, pending.message(name))
        if m is not None and version is not None and version != m.version:
            m = None
        return Response(status_code=200 if m is not None and app.state.ready else 503 if m else 404)


def _add_infer_route(
    app: FastAPI, repo: ModelRepository, metrics: ServingMetrics, options: ServeOptions, pending: PendingLoads
) -> None:
    async def infer(name: str, request: Request, version: str | None = None):
        t0 = time.perf_counter()
        label = name if name in repo.models else "_unknown"
        metrics.requests.labels(label).inc()
        if name not in repo.models and pending.message(name):
            metrics.failure(label, "unavailable")
            return _error(503, pending.message(name))
        try:
            body = await _read_body(request, options.max_body_bytes)
            t_decode = time.perf_counter()
            req = parse_infer(body, request.headers.get(HEADER_LENGTH))
            metrics.observe_phase(label, "decode", time.perf_counter() - t_decode)
            content, headers = await _score(repo, name, req, version, metrics)
        except HttpError as e:
            metrics.failure(label, e.reason)
            return _error(e.status, str(e))
        except RequestError as e:
            metrics.failure(label, "bad_request")
            return _error(400, str(e))
        except OverloadedError as e:
            metrics.failure(label, "overloaded")
            return JSONResponse({"error": str(e)}, status_code=429, headers={"Retry-After": "1"})
        except (ShuttingDownError, TierUnavailableError) as e:
            metrics.failure(label, "unavailable")
            return _error(503, str(e))
        except Exception as e:  # noqa: BLE001 - a bug: log it, answer 500, keep serving
            log.exception("infer on model '%s' failed", name)
            metrics.failure(label, "internal")
            return _error(500, f"internal error ({type(e).__name__}); see the server log")
        metrics.success(label, time.perf_counter() - t0)
        return Response(content=content, headers=headers)

    app.add_api_route("/v2/models/{name}/infer", infer, methods=["POST"])
    app.add_api_route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"])


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HttpError(413, "too_large", f"the request body ({declared} bytes) exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # also bounds bodies sent without a content-length
        size += len(chunk)
        if size > limit:
            raise HttpError(413, "too_large", f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _score(
    repo: ModelRepository, name: str, req: InferRequest, version: str | None, metrics: ServingMetrics
) -> tuple[bytes, dict]:
    model, outputs = await run_infer(repo, name, req, version, metrics)
    t_encode = time.perf_counter()
    encoded = encode_response(model.name, model.version, req, outputs)
    metrics.observe_phase(model.name, "encode", time.perf_counter() - t_encode)
    return encoded


async def run_infer(
    repo: ModelRepository, name: str, req: InferRequest, version: str | None, metrics: ServingMetrics | None = None
) -> tuple[ServedModel, dict]:
    """Check a decoded request against model ``name`` and score it in its batcher (HTTP and gRPC)."""
    user_key = req.parameters.get("user_key")
    user_key = explicit_user_key(user_key) if user_key is not None else None
    while True:
        model = resolve(repo, name, version)
        t_check = time.perf_counter()
        user, cands = _split_inputs(model, req)
        _check_outputs(model, req)
        prepared = model.prepare(user, cands, user_key)
        if metrics is not None:
            metrics.observe_phase(model.name, "validate", time.perf_counter() - t_check)
        try:
            outputs = await model.batcher.submit(prepared)
        except ShuttingDownError:
            if repo.get(name) is not model:  # a reload swapped versions meanwhile: retry on the new one
                continue
            raise
        return model, outputs


def _split_inputs(model: ServedModel, req: InferRequest) -> tuple[dict, dict]:
    spec = model.scorer.spec
    known = [s.name for s in spec.inputs]
    unknown = sorted(set(req.inputs) - set(known))
    if unknown:
        raise RequestError(f"unknown input(s) {unknown}; model '{model.name}' takes inputs {known}")
    missing = [n for n in known if n not in req.inputs]
    if missing:
        raise RequestError(f"missing input(s) {missing}; model '{model.name}' takes inputs {known}")
    for s in spec.user_inputs:  # one user per request, as the metadata says: [1, ...]
        got = list(req.inputs[s.name].shape)
        if got != [1, *s.shape]:
            raise RequestError(f"input '{s.name}' has shape {got}; model '{model.name}' takes {[1, *s.shape]} (one user)")
    user = {s.name: req.inputs[s.name] for s in spec.user_inputs}
    cands = {s.name: req.inputs[s.name] for s in spec.group_inputs}
    return user, cands


def _check_outputs(model: ServedModel, req: InferRequest) -> None:
    for name, _ in req.outputs or ():
        if name not in model.outputs:
            raise RequestError(f"unknown output '{name}'; model '{model.name}' has outputs {list(model.outputs)}")


def _add_admin_routes(app: FastAPI, repo: ModelRepository, metrics: ServingMetrics) -> None:
    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v2/repository/index")
    async def index():
        return [{"name": m.name, "version": m.version, "state": "READY"} for m in repo.models.values()] + [
            {"name": n, "state": "UNAVAILABLE", "reason": "unloaded"} for n in repo.unloaded]

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request):
        try:
            body = await _read_body(request, 1 << 20)
            params = (json.loads(body) if body.strip() else {}).get("parameters") or {}
            path = params.get("bundle")
            if path is not None and not isinstance(path, str):
                raise RequestError("parameter 'bundle' must be a path string")
            model = await repo.reload(name, path)
        except HttpError as e:
            return _error(e.status, str(e))
        except TierUnavailableError as e:  # the tier's state, not the request: try again later
            return _error(503, f"cannot load model '{name}': {e}")
        except (UgsepError, json.JSONDecodeError, AttributeError) as e:
            return _error(400, f"cannot load model '{name}': {e}")
        return {"name": model.name, "version": model.version, "bundle": str(model.path)}

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str):
        try:
            await repo.unload(name)
        except RequestError as e:
            return _error(404, str(e))
        return {"name": name, "state": "UNAVAILABLE"}
