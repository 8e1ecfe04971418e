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
for a malformed request (a message that is not a valid protobuf included: ``ProtocolGuard``),
NOT_FOUND for an unknown model or version, RESOURCE_EXHAUSTED for a full queue or a spent
latency budget, UNAVAILABLE while draining, while a model waits for its embedding tier
(``PendingLoads``) or when the tier fails, UNAUTHENTICATED without the bearer token (metadata
``authorization: Bearer TOKEN``, when the server has one), INTERNAL only for a bug.
RESOURCE_EXHAUSTED and UNAVAILABLE carry ``retry-after`` (whole seconds) in the trailing
metadata, as HTTP's ``Retry-After``. Messages are bounded (``MAX_DETAILS``: a client's huge
name is not echoed back into a status it could not receive). Messages above
``max_body_bytes`` are refused by gRPC itself (RESOURCE_EXHAUSTED). A call cancelled by its
client (or past its deadline) is counted as a disconnect and its queued work is dropped.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from runtime.errors import RequestError, TierUnavailableError, UgsepError
from runtime.serving.app import HttpError, _parse_limits, resolve, run_infer
from runtime.serving.batcher import OverloadedError, ShuttingDownError
from runtime.serving.grpc_codec import decode_infer, encode_infer
from runtime.serving.metrics import ServingMetrics
from runtime.serving.model_config import model_config
from runtime.serving.pending import PendingLoads
from runtime.serving.repository import ModelRepository, ServeOptions

log = logging.getLogger(__name__)
SERVICE = "inference.GRPCInferenceService"
C = grpc.StatusCode
GRPC_CODE = {400: C.INVALID_ARGUMENT, 401: C.UNAUTHENTICATED, 403: C.PERMISSION_DENIED, 404: C.NOT_FOUND,
             405: C.UNIMPLEMENTED, 408: C.DEADLINE_EXCEEDED, 413: C.RESOURCE_EXHAUSTED,
             415: C.INVALID_ARGUMENT, 429: C.RESOURCE_EXHAUSTED, 503: C.UNAVAILABLE}
MAX_DETAILS = 1024  # characters of a status message (a client's 200 kB model name is not echoed back)
RETRY_AFTER = "retry-after"  # trailing metadata key: whole seconds, as HTTP's Retry-After


def classify(e: Exception) -> tuple[grpc.StatusCode, str, str, int | None]:
    """(status code, metrics reason, message, retry-after seconds or None) of an infer failure,
    as the HTTP path maps it. A shape claiming more elements than its payload (HTTP 413) is
    INVALID_ARGUMENT here: the request is what is wrong, and resending it cannot succeed."""
    if isinstance(e, HttpError):
        code = GRPC_CODE.get(e.status, C.INTERNAL if e.status >= 500 else C.INVALID_ARGUMENT)
        return code, e.reason, str(e), None
    if isinstance(e, RequestError):
        return C.INVALID_ARGUMENT, "bad_request", str(e), None
    if isinstance(e, OverloadedError):
        return C.RESOURCE_EXHAUSTED, "overloaded", str(e), e.retry_after_s
    if isinstance(e, (ShuttingDownError, TierUnavailableError)):
        return C.UNAVAILABLE, "unavailable", str(e), 1
    return C.INTERNAL, "internal", f"internal error ({type(e).__name__}); see the server log", None


def bounded(message: str) -> str:
    """``message`` cut to ``MAX_DETAILS`` characters (gRPC sends it as a header-sized trailer)."""
    return message if len(message) <= MAX_DETAILS else message[: MAX_DETAILS - 28] + f"... ({len(message)} chars)"


async def abort(context, code: grpc.StatusCode, message: str, retry_after_s: int | None = None):
    """End the call with ``code``, a bounded message and, when given, ``retry-after`` metadata."""
    trailing = ((RETRY_AFTER, str(retry_after_s)),) if retry_after_s is not None else ()
    await context.abort(code, bounded(message), trailing_metadata=trailing)


class _Undecodable:
    """What ``ProtocolGuard`` hands a handler in place of a message that did not parse."""

    def __init__(self, what: str, error: Exception) -> None:
        self.message = f"the request is not a valid {what} message ({str(error)[:200]})"


class ProtocolGuard(grpc.aio.ServerInterceptor):
    """Unary RPCs whose bytes are not a valid protobuf answer INVALID_ARGUMENT, not grpc's UNKNOWN.

    grpc turns a deserializer's exception into UNKNOWN ("Unexpected DecodeError"), a server
    fault by the status mapping; the guard parses the bytes itself and lets the handler refuse
    the request as the client fault it is.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse, behavior = handler.request_deserializer, handler.unary_unary
        what = handler_call_details.method.rsplit("/", 1)[-1] + " request"

        def safe_parse(data: bytes):
            try:
                return parse(data)
            except (DecodeError, ValueError) as e:  # ValueError: invalid UTF-8 in a string field
                return _Undecodable(what, e)

        async def guarded(request, context):
            if isinstance(request, _Undecodable):
                await abort(context, C.INVALID_ARGUMENT, request.message)
            return await behavior(request, context)

        return handler._replace(request_deserializer=safe_parse, unary_unary=guarded)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 RPCs over one ModelRepository (async handlers on the server's loop)."""

    def __init__(self, repo: ModelRepository, metrics: ServingMetrics, options: ServeOptions,
                 is_ready: Callable[[], bool], pending: PendingLoads | None = None) -> None:
        self.repo, self.metrics, self.options, self.is_ready = repo, metrics, options, is_ready
        self.pending = pending or PendingLoads()
        self.expected = f"Bearer {options.token}" if options.token else None

    async def _authorize(self, context) -> None:
        if self.expected is None:
            return
        got = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(got.encode(), self.expected.encode()):
            await context.abort(C.UNAUTHENTICATED, "missing or wrong bearer token")

    async def _unless_pending(self, name: str, context, count: bool = False) -> None:
        """UNAVAILABLE + retry-after while model ``name`` waits for its embedding tier (HTTP: 503)."""
        message = self.pending.message(name) if name not in self.repo.models else None
        if message is not None:
            if count:
                self.metrics.failure("_unknown", "unavailable")
            await abort(context, C.UNAVAILABLE, message, self.pending.retry_after_s)

    async def _model(self, name: str, version: str, context):
        await self._unless_pending(name, context)
        try:
            return resolve(self.repo, name, version or None)
        except HttpError as e:
            await abort(context, GRPC_CODE.get(e.status, C.NOT_FOUND), str(e))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.is_ready() and not self.pending.waiting)

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
            await abort(context, GRPC_CODE.get(e.status, C.NOT_FOUND), str(e))
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
        await self._unless_pending(name, context, count=True)
        try:
            version = request.model_version or None
            model = resolve(self.repo, name, version)  # NOT_FOUND before any decoding, as on HTTP
            t_decode = time.perf_counter()
            req = decode_infer(request, _parse_limits(model, self.options))
            self.metrics.observe_phase(label, "decode", time.perf_counter() - t_decode)
            model, outputs = await run_infer(self.repo, name, req, version, self.metrics)
            t_encode = time.perf_counter()
            response = encode_infer(model.name, model.version, req, outputs)
            self.metrics.observe_phase(label, "encode", time.perf_counter() - t_encode)
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed: nobody to answer
            self.metrics.disconnects.labels(label).inc()
            log.info("gRPC client %s cancelled its call (model '%s')", context.peer(), name[:100])
            raise
        except Exception as e:  # noqa: BLE001 - every class maps to a status code (bugs: INTERNAL)
            code, reason, message, retry_after = classify(e)
            if code == C.INTERNAL:
                log.exception("gRPC infer on model '%s' failed", name[:100])
            self.metrics.failure(label, reason)
            await abort(context, code, message, retry_after)
        self.metrics.success(label, time.perf_counter() - t0)
        return response


class GrpcFrontend:
    """The grpc.aio server: ``await start(host, port)`` in the serving loop, ``await stop(grace)``."""

    def __init__(self, repo: ModelRepository, metrics: ServingMetrics, options: ServeOptions,
                 is_ready: Callable[[], bool], pending: PendingLoads | None = None) -> None:
        self.servicer = InferenceServicer(repo, metrics, options, is_ready, pending)
        limit = int(options.max_body_bytes)
        # so_reuseport 0: a second server on a taken port fails instead of sharing it silently
        self.server = grpc.aio.server(interceptors=[ProtocolGuard()], options=[("grpc.max_receive_message_length", limit),
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
