"""KServe v2 over gRPC: ``inference.GRPCInferenceService`` beside the HTTP app, in its event loop.

``ugsep serve --grpc-port 8001`` starts a ``grpc.aio`` server from the HTTP app's lifespan,
so both protocols share one process, one event loop and one ``ModelRepository``: the
same batchers (a gRPC and an HTTP request can share a batch), user caches, metrics,
version policy and request checks (``app.run_infer``). It binds the HTTP ``--host``
(127.0.0.1 by default). Implemented RPCs: ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelInfer, ModelConfig, ModelStatistics, RepositoryIndex;
the others answer UNIMPLEMENTED. The standard ``grpc.health.v1.Health`` service reports
SERVING while the server is ready ("" and "inference.GRPCInferenceService").

Errors carry the status code of the HTTP error class (``GRPC_CODE``): INVALID_ARGUMENT
for a malformed request, NOT_FOUND for an unknown model or version, RESOURCE_EXHAUSTED
for a full queue, UNAVAILABLE while draining, UNAUTHENTICATED without the bearer token
(metadata ``authorization: Bearer TOKEN``, when the server has one), INTERNAL for a bug.
Messages above ``max_body_bytes`` are refused by gRPC itself (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from runtime.errors import RequestError, UgsepError
from runtime.serving.app import HttpError, resolve, run_infer
from runtime.serving.batcher import OverloadedError, ShuttingDownError
from runtime.serving.grpc_codec import decode_infer, encode_infer
from runtime.serving.metrics import ServingMetrics
from runtime.serving.model_config import model_config
from runtime.serving.repository import ModelRepository, ServeOptions

log = logging.getLogger(__name__)
SERVICE = "inference.GRPCInferenceService"
C = grpc.StatusCode
GRPC_CODE = {400: C.INVALID_ARGUMENT, 401: C.UNAUTHENTICATED, 403: C.PERMISSION_DENIED, 404: C.NOT_FOUND,
             405: C.UNIMPLEMENTED, 408: C.DEADLINE_EXCEEDED, 413: C.RESOURCE_EXHAUSTED,
             415: C.INVALID_ARGUMENT, 429: C.RESOURCE_EXHAUSTED, 503: C.UNAVAILABLE}


def classify(e: Exception) -> tuple[grpc.StatusCode, str, str]:
    """(status code, metrics reason, message) of an infer failure, as the HTTP path maps it."""
    if isinstance(e, HttpError):
        return GRPC_CODE.get(e.status, C.INTERNAL if e.status >= 500 else C.INVALID_ARGUMENT), e.reason, str(e)
    if isinstance(e, RequestError):
        return C.INVALID_ARGUMENT, "bad_request", str(e)
    if isinstance(e, OverloadedError):
        return C.RESOURCE_EXHAUSTED, "overloaded", str(e)
    if isinstance(e, ShuttingDownError):
        return C.UNAVAILABLE, "unavailable", str(e)
    return C.INTERNAL, "internal", f"internal error ({type(e).__name__}); see the server log"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 RPCs over one ModelRepository (async handlers on the server's loop)."""

    def __init__(self, repo: ModelRepository, metrics: ServingMetrics, options: ServeOptions,
                 is_ready: Callable[[], bool]) -> None:
        self.repo, self.metrics, self.options, self.is_ready = repo, metrics, options, is_ready
        self.expected = f"Bearer {options.token}" if options.token else None

    async def _authorize(self, context) -> None:
        if self.expected is None:
            return
        got = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(got.encode(), self.expected.encode()):
            await context.abort(C.UNAUTHENTICATED, "missing or wrong bearer token")

    async def _model(self, name: str, version: str, context):
        try:
            return resolve(self.repo, name, version or None)
        except HttpError as e:
            await context.abort(GRPC_CODE.get(e.status, C.NOT_FOUND), str(e))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(self, request, context):
        await self._authorize(context)
        try:
            resolve(self.repo, request.name, request.version or None)
        except HttpError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.is_ready())

    async def ServerMetadata(self, request, context):
        await self._authorize(context)
        return pb.ServerMetadataResponse(name="ugsep", version="1", extensions=["model_repository", "statistics"])

    async def ModelMetadata(self, request, context):
        await self._authorize(context)
        meta = (await self._model(request.name, request.version, context)).metadata()
        tensors = lambda items: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in items]  # noqa: E731
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    async def ModelConfig(self, request, context):
        await self._authorize(context)
        model = await self._model(request.name, request.version, context)
        config = json_format.ParseDict(model_config(model, self.options), model_config_pb2.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        await self._authorize(context)
        from runtime.serving.stats import statistics

        try:
            body = statistics(self.repo, self.metrics, request.name or None, request.version or None)
        except HttpError as e:
            await context.abort(GRPC_CODE.get(e.status, C.NOT_FOUND), str(e))
        return json_format.ParseDict(body, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request, context):
        await self._authorize(context)
        index = pb.RepositoryIndexResponse()
        for m in self.repo.models.values():
            index.models.add(name=m.name, version=m.version, state="READY")
        return index

    async def ModelInfer(self, request, context):
        await self._authorize(context)
        t0 = time.perf_counter()
        name = request.model_name
        label = name if name in self.repo.models else "_unknown"
        self.metrics.requests.labels(label).inc()
        try:
            t_decode = time.perf_counter()
            req = decode_infer(request)
            self.metrics.observe_phase(label, "decode", time.perf_counter() - t_decode)
            model, outputs = await run_infer(self.repo, name, req, request.model_version or None, self.metrics)
            t_encode = time.perf_counter()
            response = encode_infer(model.name, model.version, req, outputs)
            self.metrics.observe_phase(label, "encode", time.perf_counter() - t_encode)
        except Exception as e:  # noqa: BLE001 - every class maps to a status code (bugs: INTERNAL)
            code, reason, message = classify(e)
            if code == C.INTERNAL:
                log.exception("gRPC infer on model '%s' failed", name)
            self.metrics.failure(label, reason)
            await context.abort(code, message)
        self.metrics.success(label, time.perf_counter() - t0)
        return response


class GrpcFrontend:
    """The grpc.aio server: ``await start(host, port)`` in the serving loop, ``await stop(grace)``."""

    def __init__(self, repo: ModelRepository, metrics: ServingMetrics, options: ServeOptions,
                 is_ready: Callable[[], bool]) -> None:
        self.servicer = InferenceServicer(repo, metrics, options, is_ready)
        limit = int(options.max_body_bytes)
        # so_reuseport 0: a second server on a taken port fails instead of sharing it silently
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                               ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
        self.health = _add_health(self.server)
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (0: any free port) and start serving; returns the bound port."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise UgsepError(f"--grpc-port {port}: cannot bind {address} (in use, or not an address of this host)") from e
        await self.server.start()
        await self._set_health(True)
        log.info("serving KServe v2 gRPC on %s:%d", host, self.port)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, then stop accepting RPCs and let in-flight ones finish (up to ``grace_s``)."""
        await self._set_health(False)
        await self.server.stop(grace_s)

    async def _set_health(self, serving: bool) -> None:
        if self.health is None:
            return
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.health.set(service, status)


def check_bindable(host: str, port: int) -> None:
    """Fail early, with a one-line error, when ``host:port`` cannot be bound (before loading bundles)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UgsepError(f"--grpc-port {port}: cannot bind {host}:{port} ({e.strerror})") from e


def _add_health(server):
    """The standard health service (grpcio-health-checking), when installed."""
    try:
        from grpc_health.v1 import health, health_pb2_grpc
    except ImportError:
        log.warning("grpcio-health-checking is not installed: no grpc.health.v1.Health service")
        return None
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer
