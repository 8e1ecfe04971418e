"""Running the app: ``serve`` (blocking, SIGTERM-safe) and ``ServerThread`` (tests, benchmarks).

On SIGTERM/SIGINT uvicorn stops accepting connections, waits for in-flight requests
(up to ``graceful_timeout_s``), then the app's lifespan drains every batcher, so no
accepted request is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from runtime.serving.app import build_app
from runtime.serving.repository import ServeOptions
from runtime.serving.transport import guarded_protocol

log = logging.getLogger(__name__)


def _config(app, host: str, port: int, log_level: str, graceful_timeout_s: float,
            limit_concurrency: int | None = 1024, header_timeout_s: float = 10.0,
            keep_alive_s: int = 5) -> uvicorn.Config:
    # limit_concurrency: connections+tasks beyond it get 503 from uvicorn (health and metrics
    # exempt, see transport.py); idle and slow-header connections close after header_timeout_s
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False,
        timeout_graceful_shutdown=graceful_timeout_s, lifespan="on", limit_concurrency=limit_concurrency,
        timeout_keep_alive=keep_alive_s, http=guarded_protocol(header_timeout_s),
    )


def serve(
    bundles: Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    graceful_timeout_s: float = 30.0,
    limit_concurrency: int | None = 1024,
    header_timeout_s: float = 10.0,
    keep_alive_s: int = 5,
    **options,
) -> None:
    """Serve ``bundles`` over KServe v2 HTTP until SIGTERM/SIGINT (blocking).

    ``options`` are ``ServeOptions`` fields (cache_bytes, max_queue, token, ...).
    Binds 127.0.0.1 unless ``host`` says otherwise.
    """
    options.setdefault("grpc_host", host)
    if options.get("grpc_port"):
        from runtime.serving.grpc_server import check_bindable

        check_bindable(host, int(options["grpc_port"]))
    app = build_app(bundles, ServeOptions(**options))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines%s", host,
                    "" if options.get("token") else " and WITHOUT a bearer token")
    names = ", ".join(sorted(app.state.repo.models))
    grpc = f" and grpc://{host}:{options['grpc_port']}" if options.get("grpc_port") is not None else ""
    log.info("serving model(s) %s on http://%s:%d%s", names, host, port, grpc)
    config = _config(app, host, port, log_level, graceful_timeout_s, limit_concurrency, header_timeout_s, keep_alive_s)
    uvicorn.Server(config).run()


class ServerThread:
    """A real uvicorn server on a loopback port, in a background thread.

        with ServerThread(build_app([bundle])) as srv:
            httpx.get(srv.url + "/v2/health/ready")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 graceful_timeout_s: float = 10.0, **http_limits) -> None:
        self.app = app
        self.server = uvicorn.Server(_config(app, host, port, log_level, graceful_timeout_s, **http_limits))
        self.thread = threading.Thread(target=self.server.run, name="ugsep-serve", daemon=True)
        self.host = host

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start (see the log)")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful stop, as on SIGTERM: in-flight requests finish first."""
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
