"""A health probe on its own thread and blocking sockets, independent of any load's event loop."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np


def http_get_status(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, float]:
    """(status, seconds) of one GET on a fresh connection; status 0 on a transport error."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    except (OSError, ValueError, IndexError):
        status = 0
    return status, time.perf_counter() - t0


class HealthProbe:
    """Probes ``/v2/health/live`` every ``interval`` s in a thread; ``stop()`` returns the samples."""

    ok = 200  # a sample's status when the probe was answered

    def __init__(self, port: int, interval: float = 0.05, path: str = "/v2/health/live") -> None:
        self.port, self.interval, self.path = port, interval, path
        self.samples: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(http_get_status("127.0.0.1", self.port, self.path))
            self._stop.wait(self.interval)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> dict:
        lat = np.array([t for _, t in self.samples]) * 1000 if self.samples else np.zeros(1)
        return {
            "probes": len(self.samples),
            "failed": sum(1 for s, _ in self.samples if s != self.ok),
            "health_ms_p50": round(float(np.percentile(lat, 50)), 2),
            "health_ms_p99": round(float(np.percentile(lat, 99)), 2),
            "health_ms_max": round(float(lat.max()), 2),
        }


class ProcessHealthProbe(HealthProbe):
    """``HealthProbe`` in a child process: the prober never waits for its parent's GIL, so a
    benchmark's own client work (JSON encoding, Hypothesis) stays out of the figures.
    ``grpc=True`` probes the gRPC health service from a spawned child instead (a process
    that already uses grpc must not fork)."""

    def __init__(self, port: int, interval: float = 0.05, path: str = "/v2/health/live", grpc: bool = False) -> None:
        import multiprocessing as mp

        super().__init__(port, interval, path)
        ctx = mp.get_context("spawn" if grpc else "fork")
        self._done, self._first = ctx.Event(), ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        if grpc:
            self.ok = 1
            target, args = _grpc_probe_child, (port, interval, self._done, self._first, send)
        else:
            target, args = self._child, (send,)
        self._proc = ctx.Process(target=target, args=args, daemon=True)

    def _child(self, send) -> None:
        samples = []
        while not self._done.is_set():
            samples.append(http_get_status("127.0.0.1", self.port, self.path))
            self._first.set()
            self._done.wait(self.interval)
        send.send(samples)

    def __enter__(self) -> ProcessHealthProbe:
        """Start the child and wait for its first probe (a spawned child takes seconds to start)."""
        self._proc.start()
        if not self._first.wait(120):
            raise RuntimeError("the health probe process did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._recv.poll(60):
            self.samples = self._recv.recv()
        self._proc.join(10)


def grpc_health_status(stub, timeout: float = 5.0) -> tuple[int, float]:
    """(1 if ``grpc.health.v1.Health/Check`` answered SERVING else 0, seconds)."""
    import grpc
    from grpc_health.v1 import health_pb2

    t0 = time.perf_counter()
    try:
        got = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        ok = int(got.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        ok = 0
    return ok, time.perf_counter() - t0


def _grpc_probe_loop(port: int, interval: float, stop, first=None) -> list[tuple[int, float]]:
    import grpc
    from grpc_health.v1 import health_pb2_grpc

    samples = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            samples.append(grpc_health_status(stub))
            if first is not None:
                first.set()
            stop.wait(interval)
    return samples


def _grpc_probe_child(port: int, interval: float, stop, first, send) -> None:
    send.send(_grpc_probe_loop(port, interval, stop, first))


class GrpcHealthProbe(HealthProbe):
    """``HealthProbe`` over the standard gRPC health service (one channel, a Check every
    ``interval`` s); a sample's status is 1 when it answered SERVING, else 0."""

    ok = 1

    def _run(self) -> None:
        self.samples = _grpc_probe_loop(self.port, self.interval, self._stop)

