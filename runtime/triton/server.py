"""Launch ``tritonserver`` on loopback ports, wait until it is ready, and stop it.

    with TritonServer(repo) as server:          # env: ensure_triton_env() by default
        client = tritonclient.http.InferenceServerClient(server.http_url)

All three endpoints (HTTP, gRPC, metrics) bind 127.0.0.1 on free ports picked at
start. The server's log goes to ``log_path`` (a temp file by default) and its tail
is quoted in every error, because that is where Triton says why a model did not load.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from runtime.errors import BackendUnavailableError
from runtime.triton.env import TritonEnv, ensure_triton_env

log = logging.getLogger(__name__)
HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TritonServer:
    """One ``tritonserver`` process serving ``repository`` on loopback."""

    def __init__(
        self,
        repository: str | Path,
        env: TritonEnv | None = None,
        *,
        log_path: str | Path | None = None,
        ready_timeout_s: float = 120.0,
        extra_args: list[str] | None = None,
        binary: str | Path | None = None,
        backend_dir: str | Path | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        """``binary``/``backend_dir``/``environ`` override the pytriton wheel's server and
        our Python env, e.g. to run a full Triton install (``/opt/tritonserver`` in NGC
        images, which has the onnxruntime and tensorrt backends)."""
        self.repository = Path(repository).absolute()
        if not self.repository.is_dir():
            raise BackendUnavailableError(
                f"Triton model repository '{self.repository}' is not a directory"
            )
        self.env = env
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = list(extra_args or [])
        self._log_path = Path(log_path) if log_path else None
        self.binary, self.backend_dir, self.environ = binary, backend_dir, environ
        self._proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http wants it."""
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        return self._log_path

    def command(self) -> list[str]:
        binary = self.binary or self.env.install.binary
        backend_dir = self.backend_dir or self.env.backend_dir
        return [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=10",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        """Start the process and block until every model is ready (or raise with the log)."""
        if self._proc is not None:
            return self
        if self.env is None and None in (self.binary, self.backend_dir, self.environ):
            self.env = ensure_triton_env(create=False)
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        with open(self.log_path, "wb") as logf:
            self._proc = subprocess.Popen(
                self.command(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.environ if self.environ is not None else self.env.server_environ(),
                start_new_session=True,
            )
        log.info(
            "tritonserver pid %d on http %s (log %s)", self._proc.pid, self.http_url, self.log_path
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise BackendUnavailableError(
                    f"tritonserver exited with code {code} before it was ready:\n{self.log_tail()}"
                )
            if self._ready():
                return
            time.sleep(0.25)
        raise BackendUnavailableError(
            f"tritonserver was not ready after {self.ready_timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait (Triton unloads models gracefully), then SIGKILL. Returns the exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "tritonserver pid %d did not stop in %.0fs; killing it", proc.pid, timeout_s
                )
                proc.kill()
                proc.wait()
        return proc.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
