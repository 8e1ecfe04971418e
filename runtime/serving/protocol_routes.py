"""The KServe v2 / Triton HTTP routes beyond infer and metadata, and the protocol's error body.

    GET /v2/models/{m}[/versions/{v}]/config        Triton model configuration (model_config.py)
    GET /v2/models[/{m}[/versions/{v}]]/stats       Triton statistics extension (stats.py)

Every error the web framework itself raises (unmatched route 404, 405, a malformed path
parameter) is answered with the protocol's ``{"error": message}`` body, which the Triton
clients decode, instead of the framework's ``{"detail": ...}``.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.serving.metrics import ServingMetrics
from runtime.serving.model_config import model_config
from runtime.serving.repository import ModelRepository, ServeOptions
from runtime.serving.stats import statistics


def add_protocol_routes(app: FastAPI, repo: ModelRepository, metrics: ServingMetrics, options: ServeOptions) -> None:
    """Add the config and stats routes (before ``/v2/models/{name}``) and the error handlers."""
    from runtime.serving.app import HttpError, resolve

    async def config(name: str, version: str | None = None):
        try:
            return model_config(resolve(repo, name, version), options)
        except HttpError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)

    async def stats(name: str | None = None, version: str | None = None):
        try:
            return statistics(repo, metrics, name, version)
        except HttpError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)

    app.add_api_route("/v2/models/stats", stats, methods=["GET"])
    app.add_api_route("/v2/models/{name}/stats", stats, methods=["GET"])
    app.add_api_route("/v2/models/{name}/versions/{version}/stats", stats, methods=["GET"])
    app.add_api_route("/v2/models/{name}/config", config, methods=["GET"])
    app.add_api_route("/v2/models/{name}/versions/{version}/config", config, methods=["GET"])
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"{exc.detail}: {request.method} {request.url.path}"
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse({"error": f"bad request {where}: {first.get('msg', 'invalid')}"}, status_code=400)
