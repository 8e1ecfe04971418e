"""The model-control endpoints (KServe v2 repository extension): off unless enabled.

    POST /v2/repository/models/{name}/load      reload in place, or load a bundle from
                                                {"parameters": {"bundle": "<path under the model root>"}}
    POST /v2/repository/models/{name}/unload    stop serving the model (accepted requests finish)

Loading a bundle opens files named by the client, so these routes are refused (403) unless
the server was started with ``--enable-model-control``; then each call needs the control
token (``Authorization: Bearer``; ``--model-control-token-env``, else the server token:
one of them is required to enable control), and a bundle path must resolve (symlinks
followed) to a directory under ``--model-root``. Without a model root only reloads of the
paths the server already serves are allowed.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from runtime.errors import RequestError, TierUnavailableError, UgsepError
from runtime.serving.repository import ModelRepository, ServeOptions

MAX_CONTROL_BODY = 64 << 10


def check_control_options(options: ServeOptions) -> None:
    """Refuse to start with model control enabled but no token to guard it."""
    if options.enable_model_control and not (options.control_token or options.token):
        raise UgsepError("--enable-model-control needs a token: set --model-control-token-env VAR (or --token-env)")
    if options.model_root is not None and not Path(options.model_root).is_dir():
        raise UgsepError(f"--model-root {options.model_root}: not a directory")


def add_control_routes(app: FastAPI, repo: ModelRepository, options: ServeOptions) -> None:
    """Register load/unload; each answers 403 while model control is disabled."""

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request):
        refused = _refuse(request, options)
        if refused is not None:
            return refused
        try:
            path = _bundle_param(await _small_body(request), options)
            model = await repo.reload(name, path)
        except TierUnavailableError as e:  # the tier's state, not the request: try again later
            return _error(503, f"cannot load model '{name}': {str(e)[:500]}")
        except (UgsepError, ValueError) as e:  # ValueError: bad JSON
            return _error(400, f"cannot load model '{name}': {str(e)[:500]}")
        return {"name": model.name, "version": model.version, "bundle": str(model.path)}

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str, request: Request):
        refused = _refuse(request, options)
        if refused is not None:
            return refused
        if not await repo.unload(name):
            return _error(404, f"model '{name}' is not loaded")
        return {"name": name, "state": "UNAVAILABLE"}


def _refuse(request: Request, options: ServeOptions) -> JSONResponse | None:
    if not options.enable_model_control:
        return _error(403, "model control is disabled; start the server with --enable-model-control "
                           "(and a token) to load or unload models")
    token = (options.control_token or options.token or "").encode()
    got = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(got, b"Bearer " + token):
        return JSONResponse({"error": "model control needs 'Authorization: Bearer <control token>'"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return None


async def _small_body(request: Request) -> dict:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_CONTROL_BODY:
            raise RequestError(f"the request body exceeds {MAX_CONTROL_BODY} bytes")
    doc = json.loads(body) if body.strip() else {}
    if not isinstance(doc, dict):
        raise RequestError("the body must be a JSON object")
    return doc


def _bundle_param(doc: dict, options: ServeOptions) -> Path | None:
    params = doc.get("parameters") or {}
    path = params.get("bundle") if isinstance(params, dict) else None
    if path is None:
        return None
    if not isinstance(path, str) or not path or "\0" in path:
        raise RequestError("parameter 'bundle' must be a path string")
    if options.model_root is None:
        raise RequestError("loading a new bundle path needs --model-root; without it only reloads are allowed")
    root = Path(options.model_root).resolve()
    target = (root / path).resolve()  # absolute paths are taken as they are; '..' and symlinks resolved
    if not target.is_relative_to(root):
        raise RequestError(f"bundle '{path[:200]}' is outside the model root {root}")
    return target


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
