"""Load-generator pieces shared by bench_overload.py and fuzz_server.py (loopback only).

- ``open_loop``: Poisson arrivals at a fixed rate for a bounded time (aiohttp), every
  response's status and latency;
- ``closed_loop``: N clients back to back (capacity);
- ``RssSampler``: the server process's resident memory, sampled (peak) from /proc;
- ``idle_connections`` / ``slow_senders``: connections that send nothing, or a large body
  slowly.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """Peak RSS of a process over a block, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.start_mb, self.peak_mb = pid, rss_mb(pid), 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.end_mb = rss_mb(self.pid)

    def summary(self) -> dict:
        return {"rss_mb_start": round(self.start_mb, 1), "rss_mb_peak": round(self.peak_mb, 1),
                "rss_mb_end": round(self.end_mb, 1), "rss_growth_mb": round(self.peak_mb - self.start_mb, 1)}


async def open_loop(url: str, bodies, rate: float, duration: float, seed: int, timeout: float = 60.0):
    """Poisson arrivals at ``rate``/s for ``duration`` s; returns [(status, seconds, retry_after)]."""
    import aiohttp

    rng = np.random.default_rng(seed)
    results: list[tuple[int, float, str | None]] = []
    conn = aiohttp.TCPConnector(limit=2000)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as client:

        async def one(i: int) -> None:
            body, headers = bodies[i % len(bodies)]
            t = time.perf_counter()
            try:
                async with client.post(url, data=body, headers=headers) as r:
                    await r.read()
                    results.append((r.status, time.perf_counter() - t, r.headers.get("Retry-After")))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                results.append((0, time.perf_counter() - t, None))

        tasks, t0, i = [], time.perf_counter(), 0
        next_at = t0
        while next_at - t0 < duration:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            next_at += rng.exponential(1 / rate)
        await asyncio.gather(*tasks)
    return results


async def closed_loop(url: str, bodies, concurrency: int, duration: float, max_requests: int):
    """``concurrency`` clients back to back; returns ([(status, seconds)], wall seconds)."""
    import aiohttp

    results, issued = [], 0
    t0 = time.perf_counter()
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as client:

        async def worker():
            nonlocal issued
            while issued < max_requests and time.perf_counter() - t0 < duration:
                body, headers = bodies[issued % len(bodies)]
                issued += 1
                t = time.perf_counter()
                async with client.post(url, data=body, headers=headers) as r:
                    await r.read()
                    results.append((r.status, time.perf_counter() - t))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def idle_connections(port: int, n: int) -> list[socket.socket]:
    """``n`` TCP connections that never send a byte."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setblocking(False)
        socks.append(s)
    return socks


def count_closed(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server has closed (EOF or reset)."""
    closed = 0
    for s in socks:
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def slow_sender(port: int, path: str, size: int, chunk: int, pause: float, deadline: float) -> int:
    """POST a ``size``-byte body ``chunk`` bytes every ``pause`` s; the response status (0: none)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {size}\r\n\r\n".encode())
            sent = 0
            s.settimeout(pause)
            while sent < size and time.monotonic() < deadline:
                try:
                    data = s.recv(4096)  # the server answered (408, 503) before the body ended
                    return _status(data)
                except TimeoutError:
                    pass
                s.sendall(b" " * min(chunk, size - sent))
                sent += chunk
            s.settimeout(max(0.1, deadline - time.monotonic()))
            return _status(s.recv(4096))
    except OSError:
        return 0


def _status(data: bytes) -> int:
    try:
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    except (ValueError, IndexError):
        return 0
