"""Two real `vbserve serve` processes on one Redis (`VBSERVE_TEST_REDIS_URL`, under a
fresh key prefix; skipped with the reason when none answers), and on one local Redis
Cluster (tests/redis_cluster.py), behave as one service: an
adapter pushed, updated or deleted through one replica is served, re-served or refused by
the other on its very next request. Each replica checks the adapter's current version in
the store per request (server/vbserve/engine/adapters/cache.py keys its composed cache by
version), so there is no timer to wait out."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import httpx
import pytest

from tests.conftest import byte_tokenizer, tiny_llama
from tests.redis_cluster import redis_under_test
from tests.test_api import random_adapter
from vbserve_store import encode_adapter

pytestmark = pytest.mark.redis
pytest_plugins = ["tests.redis_cluster"]  # the session fixture redis_cluster
REPO = Path(__file__).resolve().parents[1]
MODEL_SEED = 3
START_TIMEOUT_S = 120  # two model loads at once on a busy 2-core machine took 38 s


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama and its tokenizer saved as a model directory a server process loads."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(seed=MODEL_SEED).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Replica:
    proc: subprocess.Popen
    url: str
    log: Path


@contextmanager
def replica(
    model_dir: Path, store_url: str, prefix: str, log: Path, settings: Mapping[str, str] = MappingProxyType({})
) -> Iterator[Replica]:
    """A `vbserve serve` process on the tiny model over `store_url`; stopped on exit.
    `settings`: more `VBSERVE_*` variables, over these."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "VBSERVE_REDIS_PREFIX": prefix,
        "VBSERVE_TRAINING_ENABLED": "false",  # jobs are not what this test is about
        "VBSERVE_DEVICE": "cpu",
        "VBSERVE_MAX_MODEL_LEN": "256",
        **settings,
    }
    port = _free_port()
    command = [sys.executable, "-m", "vbserve.cli", "serve", "--model", str(model_dir), "--store-url", store_url]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Replica(proc, f"http://127.0.0.1:{port}", log)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(server: Replica) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert server.proc.poll() is None, f"the server exited with {server.proc.returncode}:\n{server.log.read_text()}"
        assert time.monotonic() < deadline, f"the server did not get ready:\n{server.log.read_text()}"
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass  # the port opens once the model is loaded
        time.sleep(0.2)


@pytest.fixture(params=["redis", "redis-cluster"])
def replicas(
    request: pytest.FixtureRequest, model_dir: Path, tmp_path: Path
) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    url, context = redis_under_test(request, request.param)
    with context as (_, prefix), ExitStack() as stack:
        logs = [tmp_path / f"replica-{i}.log" for i in range(2)]
        servers = [stack.enter_context(replica(model_dir, url, prefix, log)) for log in logs]
        with ThreadPoolExecutor(2) as pool:  # both start at once: start-up is mostly imports
            list(pool.map(wait_ready, servers))
        yield tuple(stack.enter_context(httpx.Client(base_url=server.url, timeout=30)) for server in servers)


def greedy_tokens(api: httpx.Client, adapter: str) -> list[int]:
    body = {"inputs": "Hello there", "parameters": {"adapter_id": adapter, "max_new_tokens": 12, "details": True}}
    r = api.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def push(api: httpx.Client, name: str, blob: bytes) -> int:
    r = api.put(f"/v1/adapters/{name}", content=blob, headers={"content-type": "application/octet-stream"})
    assert r.status_code in (200, 201), r.text
    return r.json()["version"]


def test_push_update_delete_through_one_replica_is_seen_by_the_other(replicas) -> None:
    first, second = replicas
    model = tiny_llama(seed=MODEL_SEED)
    v1, v2 = (encode_adapter(random_adapter(model, seed)) for seed in (1, 2))
    base = greedy_tokens(first, "")

    assert push(first, "bot", v1) == 1
    with_v1 = greedy_tokens(second, "bot")
    assert with_v1 == greedy_tokens(first, "bot")
    assert with_v1 != base  # the adapter is really applied

    # Both replicas now hold v1 composed in their caches; an update through one must not
    # leave the other serving it.
    assert push(second, "bot", v2) == 2
    with_v2 = greedy_tokens(first, "bot")
    assert with_v2 not in (with_v1, base)
    assert with_v2 == greedy_tokens(second, "bot")
    assert first.get("/v1/adapters/bot").json()["version"] == 2

    assert first.delete("/v1/adapters/bot").status_code == 204
    r = second.post("/generate", json={"inputs": "Hello", "parameters": {"adapter_id": "bot"}})
    assert r.status_code == 404, r.text
    assert r.json()["error"]["type"] == "not_found"
    assert second.get("/v1/adapters/bot").status_code == 404
    assert greedy_tokens(second, "") == base  # the base model is unaffected throughout
