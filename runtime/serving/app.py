"""The HTTP app: KServe v2 / Open Inference Protocol routes, metrics, reload, auth.

    GET  /v2/health/live, /v2/health/ready          (never need the token)
    GET  /v2                                        server metadata
    GET  /v2/models/{name}[/versions/{v}]           model metadata from the spec
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer     JSON and binary tensors
    POST /v2/repository/index                       loaded models
    POST /v2/repository/models/{name}/load|unload   off unless enabled (control.py)
    GET  /v2/models/{name}[/versions/{v}]/config, /v2/models[/{name}]/stats   protocol_routes.py
    GET  /metrics                                   Prometheus text format

Errors are ``{"error": message}`` with 400 (malformed request), 401 (token), 403 (model
control disabled), 404 (model), 408 (body too slow), 413 (too large), 415 (content type),
429 (over the latency budget or queue full, with Retry-After), 503 (draining, too many
bodies in flight, or the embedding tier unavailable or not holding the bundle's version,
naming it), 500 (a bug). What bounds a request before any work: intake.py (bytes, time,
memory), bounds.py (JSON depth, dims, element counts); admission.py (deadline).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from runtime.errors import BundleError, RequestError, TierUnavailableError
from runtime.serving.batcher import OverloadedError, ShuttingDownError
from runtime.serving.bounds import ParseLimits, TooLargeError
from runtime.serving.cache import explicit_user_key
from runtime.serving.compression import add_compression
from runtime.serving.control import add_control_routes, check_control_options
from runtime.serving.intake import (
    BodyBudget,
    ClientGone,
    HttpError,
    check_content_type,
    read_body,
    unless_disconnected,
)
from runtime.serving.metrics import CONTENT_TYPE, ServingMetrics
from runtime.serving.pending import PendingLoads
from runtime.serving.protocol import HEADER_LENGTH, InferRequest, encode_response, parse_infer
from runtime.serving.protocol_routes import add_protocol_routes
from runtime.serving.repository import ModelRepository, ServedModel, ServeOptions, load_model
from runtime.serving.tier_metrics import TierCollector, tier_stats

log = logging.getLogger(__name__)
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
CONTROL_PREFIX = "/v2/repository/models/"
OFFLOAD_BYTES = 64 << 10  # bodies past this are parsed on a worker thread, not the event loop


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(bundles: Sequence[str | Path], options: ServeOptions | None = None, **overrides) -> FastAPI:
    """Load and verify every bundle (blocking), and return the ASGI app that serves them."""
    options = options or ServeOptions()
    for k, v in overrides.items():
        if not hasattr(options, k):
            raise TypeError(f"unknown serve option '{k}'")
        setattr(options, k, v)
    if not bundles:
        raise BundleError("serve needs at least one bundle")
    check_control_options(options)
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
    _add_auth(app, options)
    add_compression(app, options.max_body_bytes)
    add_protocol_routes(app, repo, metrics, options)  # before /v2/models/{name}: /v2/models/stats
    _add_health_routes(app, repo, pending)
    _add_infer_route(app, repo, metrics, options, pending)
    _add_admin_routes(app, repo, metrics)
    add_control_routes(app, repo, options)
    return app


async def _start_grpc(app: FastAPI):
    """The KServe v2 gRPC server in this event loop, on the same repository (runtime/serving/grpc_server.py)."""
    from runtime.serving.grpc_server import GrpcFrontend

    s = app.state
    frontend = GrpcFrontend(s.repo, s.metrics, s.options, lambda: bool(app.state.ready), s.pending)
    s.grpc_port = await frontend.start(s.options.grpc_host, s.options.grpc_port)
    return frontend


def _add_auth(app: FastAPI, options: ServeOptions) -> None:
    if options.token:  # the control routes check their own token when they have one
        app.add_middleware(BearerAuth, token=options.token, own_auth=bool(options.control_token))


class BearerAuth:
    """Pure ASGI middleware: every path but the health probes needs ``Authorization: Bearer``."""

    def __init__(self, app, token: str, own_auth: bool = False) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()
        self.own_auth = own_auth

    def _open(self, path: str) -> bool:
        return path in OPEN_PATHS or (self.own_auth and path.startswith(CONTROL_PREFIX))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._open(scope["path"]):
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
        if name not in repo.models and pending.message(name):
            return _error(503, pending.message(name), {"Retry-After": str(pending.retry_after_s)})
        try:
            return resolve(repo, name, version).metadata()
        except HttpError as e:
            return _error(e.status, str(e))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        m = repo.get(name)
        if m is None and pending.message(name):
            return _error(503, pending.message(name), {"Retry-After": str(pending.retry_after_s)})
        if m is not None and version is not None and version != m.version:
            m = None
        return Response(status_code=200 if m is not None and app.state.ready else 503 if m else 404)


def _add_infer_route(
    app: FastAPI, repo: ModelRepository, metrics: ServingMetrics, options: ServeOptions, pending: PendingLoads
) -> None:
    budget = BodyBudget(options.max_inflight_body_bytes or 8 * options.max_body_bytes)

    async def infer(name: str, request: Request, version: str | None = None):
        t0 = time.perf_counter()
        label = name if name in repo.models else "_unknown"
        metrics.requests.labels(label).inc()
        if name not in repo.models and pending.message(name):
            metrics.failure(label, "unavailable")
            return _error(503, pending.message(name), {"Retry-After": str(pending.retry_after_s)})
        try:
            content, headers = await _handle(repo, name, version, request, options, budget, metrics)
        except ClientGone:
            metrics.disconnects.labels(label).inc()
            log.info("client %s closed the connection before its response (model '%s')",
                     _peer(request), name[:100])
            return Response(status_code=499)  # never sent: nobody is listening
        except HttpError as e:
            metrics.failure(label, e.reason)
            return _error(e.status, str(e), e.headers)
        except RequestError as e:
            too_large = isinstance(e, TooLargeError)
            metrics.failure(label, "too_large" if too_large else "bad_request")
            return _error(413 if too_large else 400, str(e))
        except OverloadedError as e:
            metrics.failure(label, "overloaded")
            return _error(429, str(e), {"Retry-After": str(e.retry_after_s)})
        except (ShuttingDownError, TierUnavailableError) as e:
            metrics.failure(label, "unavailable")
            return _error(503, str(e), {"Retry-After": "1"})
        except Exception as e:  # noqa: BLE001 - a bug: log it, answer 500, keep serving
            log.exception("infer on model '%s' failed", name)
            metrics.failure(label, "internal")
            return _error(500, f"internal error ({type(e).__name__}); see the server log")
        metrics.success(label, time.perf_counter() - t0)
        return Response(content=content, headers=headers)

    app.add_api_route("/v2/models/{name}/infer", infer, methods=["POST"])
    app.add_api_route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"])


async def _handle(repo: ModelRepository, name: str, version: str | None, request: Request,
                  options: ServeOptions, budget: BodyBudget, metrics: ServingMetrics) -> tuple[bytes, dict]:
    """Every bound before any work: type, model, admission, then the body, then parsing."""
    check_content_type(request.headers.get("content-type"))
    model = _model(repo, name)
    model.batcher.admit(0)  # shed before reading the body when the queue alone is over budget
    async with read_body(request.receive, request.headers, options.max_body_bytes,
                         options.body_timeout_s, budget) as body:
        args = (body, request.headers.get(HEADER_LENGTH), _parse_limits(model, options))
        t_decode = time.perf_counter()
        req = await asyncio.to_thread(parse_infer, *args) if len(body) > OFFLOAD_BYTES else parse_infer(*args)
        metrics.observe_phase(model.name, "decode", time.perf_counter() - t_decode)
    return await unless_disconnected(_score(repo, name, req, version, metrics), request.receive)


def _parse_limits(model: ServedModel, options: ServeOptions) -> ParseLimits:
    """Element bounds per input from the spec: max_candidates rows of the input's shape."""
    rows = model.scorer.max_candidates
    bounds = {s.name: rows * math.prod(s.shape) for s in model.scorer.spec.inputs}
    return ParseLimits(max_json_bytes=options.max_json_bytes, max_elements=bounds, max_rows=rows)


def _peer(request: Request) -> str:
    c = request.client
    return f"{c.host}:{c.port}" if c else "?"


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

