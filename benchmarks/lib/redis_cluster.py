"""A real local Redis Cluster, for tests and benchmarks: three primaries, each with a replica.

Six redis-server processes in cluster mode on free loopback ports (each also needs its
port + 10000 free, the cluster bus), joined by `redis-cli --cluster create`. No
persistence; a short `cluster-node-timeout` so that a killed primary's replica takes
over within a few seconds.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")

NODE_TIMEOUT_MS = 1000


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """`count` ports whose bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20_000, 40_000)
        if port not in ports and _free(port) and _free(port + 10_000):
            ports.append(port)
    return ports


def _command(port: int, *args: str, timeout: float = 5.0) -> str:
    assert REDIS_CLI is not None
    done = subprocess.run(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout


class ClusterNode:
    """One redis-server in cluster mode; its node file (identity, role) lives in `folder`."""

    def __init__(self, port: int, folder: Path, node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        self.port = port
        self.folder = folder
        self.node_timeout_ms = node_timeout_ms
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{self.port}.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                # As recommended for the session store: the other shards answer while one
                # has no primary.
                "--cluster-require-full-coverage",
                "no",
                "--dir",
                str(self.folder),
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if _command(self.port, "PING").strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last words to the cluster."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def role(self) -> str:
        """ "master" or "slave" as the node itself says (ROLE), "" when it does not answer."""
        try:
            lines = _command(self.port, "ROLE", timeout=2).split()
        except subprocess.TimeoutExpired:
            return ""
        return lines[0] if lines else ""


class RedisCluster:
    """Three primaries and three replicas on loopback; `url` names two seed nodes."""

    def __init__(
        self,
        folder: Path,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
    ) -> None:
        count = primaries * (1 + replicas)
        self.nodes = [ClusterNode(p, folder, node_timeout_ms) for p in cluster_ports(count)]
        self.replicas = replicas

    @staticmethod
    def command(port: int, *args: str) -> str:
        """What redis-cli prints for one command to the node on `port`."""
        return _command(port, *args)

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])
        return f"redis+cluster://{seeds}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        assert REDIS_CLI is not None
        created = subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running node says the cluster is ok and sees every slot served, and
        every running replica is in sync with its primary."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [n for n in self.nodes if n.proc is not None]
            infos = [_command(n.port, "CLUSTER", "INFO") for n in running]
            if all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos):
                # ... and every replica has its primary's data (WAIT counts on it).
                links = [_command(n.port, "INFO", "replication") for n in running]
                if all("role:master" in i or "master_link_status:up" in i for i in links):
                    return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become healthy")

    def primaries(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.proc is not None and n.role() == "master"]

    def primary_of(self, key: str) -> ClusterNode:
        """The primary that holds `key` (the others answer MOVED)."""
        for node in self.primaries():
            if _command(node.port, "EXISTS", key).strip() == "1":
                return node
        raise LookupError(f"no primary holds {key!r}")

    def replica_of(self, primary: ClusterNode) -> ClusterNode:
        """A running replica of `primary`."""
        for node in self.nodes:
            if node.proc is None or node is primary:
                continue
            info = _command(node.port, "INFO", "replication")
            if f"master_port:{primary.port}\r" in info or f"master_port:{primary.port}\n" in info:
                return node
        raise LookupError(f"no replica of the primary on port {primary.port}")

    def wait_promoted(self, node: ClusterNode, timeout: float = 30.0) -> float:
        """Seconds until `node` (a replica) is a primary and the cluster is ok again."""
        start = time.monotonic()
        while node.role() != "master":
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"the replica on port {node.port} was not promoted")
            time.sleep(0.05)
        self.wait_healthy(timeout)
        return time.monotonic() - start

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
