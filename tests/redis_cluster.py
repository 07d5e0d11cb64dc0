"""A real local Redis Cluster for tests, as a pytest plugin: a test module that sets
`pytest_plugins = ["tests.redis_cluster"]` may request `redis_cluster`.

The fixture starts three `redis-server --cluster-enabled yes` processes on free loopback
ports in a tmp folder (no persistence) and joins them with `redis-cli --cluster create`,
once per test session (about 2 s). Skipped, saying why, without redis-server and
redis-cli."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import pytest
import redis
from redis.cluster import RedisCluster

from tests.conftest import REDIS_URL, redis_test_prefix

CLUSTER_NODES = 3
CLUSTER_BUS_OFFSET = 10_000  # a cluster node also listens on its port + 10000


@dataclass(frozen=True)
class LocalCluster:
    url: str  # redis+cluster://127.0.0.1:<first node's port>
    ports: tuple[int, ...]

    @contextmanager
    def test_prefix(self) -> Iterator[tuple[RedisCluster, str]]:
        """A cluster client and a fresh key prefix whose keys (on every node) are
        deleted afterwards: conftest's `redis_test_prefix` for the cluster."""
        client = RedisCluster(host="127.0.0.1", port=self.ports[0])
        prefix = f"vbstest-{uuid.uuid4().hex[:12]}"
        try:
            yield client, prefix
        finally:
            for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
                client.delete(key)
            client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A fresh cluster of three primaries (no replicas) on loopback."""
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.skip("redis-server and redis-cli are needed to start a local Redis Cluster")
    folder = tmp_path_factory.mktemp("redis-cluster")
    ports = tuple(_free_node_port() for _ in range(CLUSTER_NODES))
    nodes = []
    try:
        for port in ports:
            command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
            command += ["--cluster-config-file", f"nodes-{port}.conf", "--save", "", "--appendonly", "no"]
            nodes.append(subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL))
        for port in ports:
            _wait_until(lambda port=port: _reply(port, "PING") is True, f"redis-server on port {port}")
        addresses = [f"127.0.0.1:{port}" for port in ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for port in ports:
            # Each node must have learnt the whole slot map before a client asks it.
            _wait_until(lambda port=port: _cluster_ok(port), f"the cluster state on port {port}")
        yield LocalCluster(f"redis+cluster://127.0.0.1:{ports[0]}", ports)
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(timeout=10)


def _free_node_port() -> int:
    """A loopback port that is free, and whose cluster bus port is free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _reply(port: int, *command: str) -> object:
    """A node's parsed reply, or None while it does not answer."""
    client = redis.Redis(port=port, socket_connect_timeout=0.5, decode_responses=True)
    try:
        return client.execute_command(*command)
    except redis.RedisError:
        return None
    finally:
        client.close()


def _cluster_ok(port: int) -> bool:
    return "cluster_state:ok" in str(_reply(port, "CLUSTER", "INFO"))


def redis_under_test(request: pytest.FixtureRequest, kind: str) -> tuple[str, AbstractContextManager]:
    """(URL, `redis_test_prefix`-like context) of the Redis that a backend parameter names:
    "redis" is the shared server at REDIS_URL, "redis-cluster" the session's local cluster."""
    if kind == "redis":
        return REDIS_URL, redis_test_prefix()
    cluster: LocalCluster = request.getfixturevalue("redis_cluster")
    return cluster.url, cluster.test_prefix()
