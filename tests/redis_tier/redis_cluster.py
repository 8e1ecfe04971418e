"""A real Redis Cluster for tests: N masters (+ replicas) of Debian's redis-server on free
loopback ports in a temp dir, created with ``redis-cli --cluster create``, stopped at the end.

Each node runs with an fsync-always AOF, so a node killed with SIGKILL and restarted comes
back with its rows (a durable node), and ``cluster-require-full-coverage no``, so the other
masters keep answering for their slots while one is down (the documented deployment).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"

NODE_CONF = """\
port {port}
bind 127.0.0.1
daemonize no
dir {dir}
logfile {dir}/redis.log
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout {node_timeout_ms}
cluster-require-full-coverage no
cluster-replica-validity-factor 0
appendonly {aof}
appendfsync always
save ""
"""


def require_redis_server() -> None:
    """Skip when redis-server is absent and we cannot install it; fail in CI (root)."""
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return
    if os.geteuid() == 0:
        pytest.fail("redis-server/redis-cli missing: run `make system-deps` (installs Debian's redis-server)")
    pytest.skip("redis-server not installed: apt-get install redis-server redis-tools (or make system-deps as root)")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` ports p with p and the cluster bus port p + 10000 both free."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind((HOST, 0))
            p = s.getsockname()[1]
        if p + 10000 < 65536 and p not in ports and _port_free(p + 10000):
            ports.append(p)
    return ports


class LocalRedisCluster:
    """Start, break and stop a loopback Redis Cluster."""

    def __init__(self, root: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000,
                 durable: bool = True) -> None:
        self.root, self.masters, self.replicas, self.durable = Path(root), masters, replicas, durable
        self.node_timeout_ms = node_timeout_ms
        self.ports = free_ports(masters * (1 + replicas))
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.ports[0]}"

    def start(self) -> LocalRedisCluster:
        for port in self.ports:
            self._spawn(port)
        for port in self.ports:
            self._wait_ping(port)
        nodes = [f"{HOST}:{p}" for p in self.ports]
        subprocess.run(["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", str(self.replicas),
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok()
        return self

    def cli(self, port: int, *args: str, timeout: float = 5) -> str:
        r = subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), *args], capture_output=True, text=True,
                           timeout=timeout)
        return r.stdout

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every running node reports cluster_state:ok with all slots served."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = [self.cli(p, "cluster", "info") for p in self.procs]
            if all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos):
                return
            time.sleep(0.1)
        raise TimeoutError(f"Redis Cluster on {self.ports} not ok after {timeout}s")

    def master_ports(self) -> list[int]:
        """Ports of the nodes that are masters now (fail-over changes this)."""
        out = self.cli(self.ports[0] if self.ports[0] in self.procs else next(iter(self.procs)), "cluster", "nodes")
        return sorted(int(line.split()[1].split(":")[1].split("@")[0]) for line in out.splitlines()
                      if "master" in line.split()[2] and "fail" not in line.split()[2])

    def kill(self, port: int) -> None:
        """SIGKILL one node (a crash)."""
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, port: int) -> None:
        """Start a killed node again on its port, with its nodes.conf and AOF."""
        self._spawn(port)
        self._wait_ping(port)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def _spawn(self, port: int) -> None:
        d = self.root / str(port)
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "redis.conf"
        conf.write_text(NODE_CONF.format(port=port, dir=d, node_timeout_ms=self.node_timeout_ms,
                                         aof="yes" if self.durable else "no"))
        self.procs[port] = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)

    def _wait_ping(self, port: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[port].poll() is not None:
                log = (self.root / str(port) / "redis.log").read_text()[-500:]
                raise RuntimeError(f"redis-server on port {port} exited: {log}")
            if "PONG" in self.cli(port, "ping"):
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {port} did not answer PING in {timeout}s")
