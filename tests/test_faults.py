"""Faults and load, against a real uvicorn server on loopback (issue #7).

1. Redis outage: a private redis-server (its own port, AOF on, so what it held survives
   its restart) is stopped under load. Adapters already composed keep being served
   (stale-on-outage), uncached ones and store routes get 503 with Retry-After, /readyz
   says 503, no request hangs and the process survives; Redis restarted on the same port,
   the service recovers by itself and a fine-tuning job queued before the outage runs.
2. Overload: 100 concurrent requests against an engine of 4 rows and 8 queue places:
   the admitted finish, the rest get 429 at once, p99 and memory stay bounded. Per-tenant
   limits hold under concurrency, and a noisy tenant hammering its limits does not starve
   a quiet one.

The figures each test measures are printed (`pytest -s`) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from tests.conftest import described, serve_in_thread, tiny_llama
from tests.test_api import api_settings, chat_tokenizer, error_of, random_adapter
from tests.test_jobs_api import TASK_FORM
from tests.test_training import TASK_FILE
from tests.test_training import one_torch_thread as one_torch_thread  # autouse: tiny models, one thread
from vbserve.app import create_app
from vbserve.tenancy import SQLiteTenantRegistry, TenantLimits
from vbserve.training import queue_limits
from vbserve.training.jobs import RedisJobQueue
from vbserve.training.worker import Worker
from vbserve.worker_host import start_embedded_worker
from vbserve_store import RedisAdapterStore, encode_adapter
from vbserve_store.store import SQLiteAdapterStore

REDIS_SERVER = shutil.which("redis-server")
ADMIN_KEY = "faults-admin-key-0123456789abcdef"
OCTET = {"content-type": "application/octet-stream"}
SHORT = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
# No request may take longer than this, whatever state Redis is in.
REQUEST_BOUND_S = 10.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A redis-server of our own, so a test can kill and restart it. AOF with an fsync
    per write: what it acknowledged survives the restart, as on a production Redis with
    persistence (`--save ''` alone would come back empty and lose every queued job)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)
        self.proc = None


@contextmanager
def private_redis(folder: Path) -> Iterator[RedisProcess]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


# -- 1. Redis outage --------------------------------------------------------------------------


@dataclass
class Probe:
    name: str
    method: str
    path: str
    json: dict | None = None


# What the load threads send over and over, before, during and after the outage.
LOAD = [
    Probe("cached a0", "POST", "/v1/completions", {"model": "a0", **SHORT}),
    Probe("cached a1 chat", "POST", "/v1/chat/completions",
          {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}),
    Probe("base model", "POST", "/generate", {"inputs": "hello", "parameters": {"max_new_tokens": 4}}),
    Probe("readyz", "GET", "/readyz"),
    Probe("healthz", "GET", "/healthz"),
]  # fmt: skip
# What needs the store: 503 + Retry-After while it is down.
NEEDS_STORE = [
    Probe("uncached a2", "POST", "/v1/completions", {"model": "a2", **SHORT}),
    Probe("uncached a2 stream", "POST", "/v1/completions", {"model": "a2", "stream": True, **SHORT}),
    Probe("list adapters", "GET", "/v1/adapters"),
    Probe("adapter info", "GET", "/v1/adapters/a0"),
    Probe("pull adapter", "GET", "/v1/adapters/a0/content"),
    Probe("list models", "GET", "/v1/models"),
    Probe("list jobs", "GET", "/v1/fine_tuning/jobs"),
    Probe("delete adapter", "DELETE", "/v1/adapters/a1"),
]


@dataclass
class Sample:
    probe: str
    start: float
    end: float
    status: int | None
    error: str | None = None


def wait_for_every_probe(samples: list[Sample], since: float) -> None:
    """Until each LOAD probe has completed once after `since` (a loaded machine may take
    more than a fixed sleep to get through the round)."""
    deadline = time.monotonic() + 30
    while {s.probe for s in list(samples) if s.start >= since} < {p.name for p in LOAD}:
        assert time.monotonic() < deadline, "the load did not get through every probe"
        time.sleep(0.05)


def load_loop(url: str, key: str, stop: threading.Event, out: list[Sample]) -> None:
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
        i = 0
        while not stop.is_set():
            probe = LOAD[i % len(LOAD)]
            i += 1
            start = time.monotonic()
            try:
                r = client.request(probe.method, probe.path, json=probe.json)
                out.append(Sample(probe.name, start, time.monotonic(), r.status_code))
            except httpx.HTTPError as exc:
                out.append(Sample(probe.name, start, time.monotonic(), None, repr(exc)))


def test_redis_outage_serves_cached_adapters_fails_fast_and_recovers(tmp_path) -> None:
    with private_redis(tmp_path) as rds:
        settings = api_settings(
            store_url=rds.url,
            admin_key=ADMIN_KEY,
            embedded_worker=False,  # a `vbserve worker` is started below, in the outage
            training_max_file_bytes=64 << 10,
            training_max_num_vectors=256,
        )
        app = create_app(settings, model=tiny_llama(seed=7), tokenizer=chat_tokenizer())
        base = tiny_llama(seed=7)
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            assert c.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin).status_code == 201
            key = c.post("/v1/admin/tenants/acme/keys", headers=admin).json()["key"]
            unused_key = c.post("/v1/admin/tenants/acme/keys", headers=admin).json()[
                "key"
            ]  # never seen by the outage cache
            c.headers["Authorization"] = f"Bearer {key}"
            for i in range(3):
                r = c.put(f"/v1/adapters/a{i}", content=encode_adapter(random_adapter(base, i)), headers=OCTET)
                assert r.status_code == 201, r.text
            for probe in LOAD:  # a0 and a1 composed and cached; a2 never used
                r = c.request(probe.method, probe.path, json=probe.json)
                assert r.status_code == 200, (probe, r.text)
            job = c.post(
                "/v1/fine_tuning/jobs",
                data={**TASK_FORM, "adapter": "trained", "max_steps": "5"},
                files={"training_file": ("train.jsonl", TASK_FILE, "application/jsonl")},
            )
            assert job.status_code == 201, job.text
            job_id = job.json()["id"]

            samples: list[Sample] = []
            stop = threading.Event()
            threads = [threading.Thread(target=load_loop, args=(url, key, stop, samples)) for _ in range(6)]
            for t in threads:
                t.start()
            wait_for_every_probe(samples, since=0.0)
            outage_start = time.monotonic()
            rds.stop()  # SIGTERM: Redis goes away under load
            outage_down = time.monotonic()

            # While it is down: what needs the store answers 503 + Retry-After, fast.
            outage_checks = []
            for probe in NEEDS_STORE:
                start = time.monotonic()
                r = c.request(probe.method, probe.path, json=probe.json)
                elapsed = time.monotonic() - start
                outage_checks.append((probe.name, r.status_code, elapsed))
                assert r.status_code == 503, (probe, r.text)
                assert r.headers["retry-after"] == "5" and error_of(r)["type"] == "unavailable", probe
                assert "127.0.0.1" not in r.text and str(rds.port) not in r.text  # no internals leak
                assert elapsed < 2.0, (probe, elapsed)
            # A key never authenticated before the outage cannot be checked: 503, not 401.
            r = c.get("/v1/adapters", headers={"Authorization": f"Bearer {unused_key}"})
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            # An upload is refused whole (nothing half-written to come back after).
            r = c.put("/v1/adapters/a3", content=encode_adapter(random_adapter(base, 3)), headers=OCTET)
            assert r.status_code == 503, r.text
            # A worker started in the outage waits for the queue instead of dying.
            worker_settings = settings.model_copy(update={"embedded_worker": True})
            worker_model, worker_tokenizer = tiny_llama(seed=7), chat_tokenizer()
            worker = Worker(
                RedisJobQueue.from_url(rds.url, limits=queue_limits(worker_settings)),
                RedisAdapterStore.from_url(rds.url),
                worker_model,
                worker_tokenizer,
                described(worker_model, worker_tokenizer, worker_settings),
            )
            embedded = start_embedded_worker(worker_settings, worker)
            time.sleep(2.0)  # more load, Redis still down

            restart_at = time.monotonic()
            rds.start()  # the same port, the same data directory
            restarted = time.monotonic()
            deadline = restarted + 10
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "did not recover within 10 s of Redis coming back"
                time.sleep(0.05)
            recovered_after = time.monotonic() - restarted
            wait_for_every_probe(samples, since=restarted + recovered_after)
            stop.set()
            for t in threads:
                t.join(timeout=60)

            # After: everything answers again, without a restart of the API.
            for probe in [*LOAD, *NEEDS_STORE[:-1]]:
                r = c.request(probe.method, probe.path, json=probe.json)
                assert r.status_code == 200, (probe, r.text)
            assert c.get("/v1/adapters", headers={"Authorization": f"Bearer {unused_key}"}).status_code == 200
            # The job queued before the outage ran, and its adapter serves.
            deadline = time.monotonic() + 60
            while (state := c.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] != "succeeded":
                assert state["status"] in ("queued", "running") and time.monotonic() < deadline, state
                time.sleep(0.1)
            assert c.post("/v1/completions", json={"model": "trained", **SHORT}).status_code == 200
            embedded.stop(timeout=30)
            worker.queue.close()
            worker.store.close()

        # -- what the load saw --
        assert samples and all(s.error is None for s in samples), [s for s in samples if s.error][:5]
        latencies = [s.end - s.start for s in samples]
        assert max(latencies) < REQUEST_BOUND_S, max(latencies)
        during = [s for s in samples if s.start >= outage_down and s.end <= restart_at]
        before = [s for s in samples if s.end <= outage_start]
        after = [s for s in samples if s.start >= restarted + recovered_after]
        assert len(during) > 20 and before and after, (len(before), len(during), len(after))
        for s in samples:  # served from memory in every phase, also across the transitions
            if s.probe != "readyz":
                assert s.status == 200, s
        assert {s.status for s in before if s.probe == "readyz"} == {200}
        assert {s.status for s in during if s.probe == "readyz"} == {503}
        assert {s.status for s in after if s.probe == "readyz"} == {200}
        statuses = Counter((s.probe, s.status) for s in during)
        print(
            f"\nredis outage: {len(samples)} load requests ({len(during)} while down, {outage_checks.__len__()} "
            f"store-bound checks), statuses while down {dict(statuses)}; latency p50 "
            f"{statistics.median(latencies) * 1000:.0f} ms, p99 {percentile(latencies, 99) * 1000:.0f} ms, max "
            f"{max(latencies) * 1000:.0f} ms; 503s while down took at most "
            f"{max(e for _, _, e in outage_checks) * 1000:.0f} ms; ready again {recovered_after:.2f} s after "
            f"Redis restarted; outage lasted {restart_at - outage_start:.1f} s"
        )


# -- 2. overload ------------------------------------------------------------------------------


# The load comes from another process, so the client's own work does not share the
# server's interpreter lock (with it in-process, the client was the bottleneck).
LOADER = r"""
import asyncio, json, sys, time
import httpx

async def one(client, spec):
    start = time.monotonic()
    r = await client.request(spec["method"], spec["path"], json=spec.get("json"), headers=spec.get("headers"))
    kind = r.json()["error"]["type"] if r.status_code >= 400 else None
    return {"status": r.status_code, "latency": time.monotonic() - start, "type": kind,
            "retry_after": r.headers.get("retry-after")}

async def main(job):
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=job["url"], timeout=60, limits=limits) as client:
        start = time.monotonic()
        if job["mode"] == "gather":
            results = await asyncio.gather(*(one(client, spec) for spec in job["specs"]))
        else:  # hammer: `concurrency` loops over the specs for `seconds`
            results = []
            async def loop(i):
                while time.monotonic() - start < job["seconds"]:
                    results.append(await one(client, job["specs"][i % len(job["specs"])]))
            await asyncio.gather(*(loop(i) for i in range(job["concurrency"])))
        print(json.dumps({"results": results, "wall": time.monotonic() - start}))

asyncio.run(main(json.loads(sys.argv[1])))
"""


def load_from_another_process(url: str, mode: str, specs: list[dict], **kw) -> dict:
    job = json.dumps({"url": url, "mode": mode, "specs": specs, **kw})
    run = subprocess.run([sys.executable, "-c", LOADER, job], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


async def timed(client: httpx.AsyncClient, method: str, path: str, **kw) -> tuple[int, float, httpx.Response]:
    start = time.monotonic()
    r = await client.request(method, path, **kw)
    return r.status_code, time.monotonic() - start, r


def rss_bytes() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


class PeakRSS:
    """Samples this process's RSS every 20 ms while active."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


OVERLOAD_REQUESTS = 100
NOISY_SECONDS = 4.0
LONG = {"prompt": "overload", "max_tokens": 48, "temperature": 0}


def test_overload_admits_what_fits_and_refuses_the_rest_at_once(tmp_path) -> None:
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    base = tiny_llama(seed=7)
    store.put("default", "a0", random_adapter(base, 0))
    app = create_app(
        api_settings(max_batch_size=4, max_queue=8), model=tiny_llama(seed=7), tokenizer=chat_tokenizer(), store=store
    )

    def run(url: str) -> dict:
        with httpx.Client(base_url=url, timeout=60) as client:
            # Warm up (composes a0) and time one request alone: the engine's capacity.
            client.post("/v1/completions", json={"model": "a0", **LONG})
            start = time.monotonic()
            assert client.post("/v1/completions", json={"model": "a0", **LONG}).status_code == 200
            alone = time.monotonic() - start
            # The same burst of the cheapest request: what answering 100 connections at once
            # costs this server on this machine, whatever the answer.
            floor = load_from_another_process(
                url, "gather", [{"method": "GET", "path": "/healthz"}] * OVERLOAD_REQUESTS
            )
            rss_before = rss_bytes()
            specs = [
                {"method": "POST", "path": "/v1/completions", "json": {"model": "a0" if i % 2 else None, **LONG}}
                for i in range(OVERLOAD_REQUESTS)
            ]
            with PeakRSS() as peak:
                load = load_from_another_process(url, "gather", specs)
            after = client.post("/v1/completions", json={"model": "a0", **LONG}).status_code
        return dict(alone=alone, load=load, floor=floor, rss_before=rss_before, peak=peak.peak, after=after)

    with serve_in_thread(app) as url:
        m = run(url)
    store.close()
    results = m["load"]["results"]
    ok = [r["latency"] for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    assert len(ok) + len(refused) == OVERLOAD_REQUESTS, Counter(r["status"] for r in results)
    # At least the queue's 8 are admitted; the batch's 4 more only if the engine thread moved
    # requests out of the queue while the burst arrived (it did not once, on a busy machine: 9).
    assert len(ok) >= 8 and len(refused) >= OVERLOAD_REQUESTS // 2, (len(ok), len(refused))
    assert all(r["type"] == "overloaded" and r["retry_after"] == "1" for r in refused)
    refusal = [r["latency"] for r in refused]
    # Refused at once: no slower than a burst of /healthz (the cost of 100 connections at
    # once) by more than a small factor, and before the admitted ones are done.
    floor = percentile([r["latency"] for r in m["floor"]["results"]], 99)
    assert percentile(refusal, 99) < 3 * floor + 0.25, (percentile(refusal, 99), floor)
    assert statistics.median(refusal) < statistics.median(ok)
    # Admitted ones wait at most for the queue ahead of them: (4 rows + 8 queued) / 4 rows
    # = 3 generations' time, plus slack for a shared 2-CPU machine.
    assert percentile(ok, 99) < 6 * m["alone"] + 2.0, (percentile(ok, 99), m["alone"])
    growth = m["peak"] - m["rss_before"]
    assert growth < 256 << 20, growth
    assert m["after"] == 200  # still serving
    capacity = 4 / m["alone"]  # requests per second the engine finishes with every row busy
    print(
        f"\noverload: {OVERLOAD_REQUESTS} concurrent requests, all answered within {m['load']['wall']:.2f} s: "
        f"{OVERLOAD_REQUESTS / m['load']['wall'] / capacity:.1f}x the engine's capacity of {capacity:.1f} req/s; admitted "
        f"{len(ok)}, 429 {len(refused)}; refusal p50 {statistics.median(refusal) * 1000:.0f} ms p99 "
        f"{percentile(refusal, 99) * 1000:.0f} ms (100 concurrent /healthz: p99 {floor * 1000:.0f} ms); admitted p50 {statistics.median(ok):.2f} s p99 "
        f"{percentile(ok, 99):.2f} s (one request alone {m['alone']:.2f} s); RSS "
        f"{m['rss_before'] / 2**20:.0f} MiB -> peak {m['peak'] / 2**20:.0f} MiB"
    )


def test_tenant_limits_hold_under_concurrency_and_a_noisy_tenant_does_not_starve_a_quiet_one(tmp_path) -> None:
    store = SQLiteAdapterStore(tmp_path / "adapters.db")
    registry = SQLiteTenantRegistry(tmp_path / "tenants.db")
    keys = {}
    for name, limits in [
        ("quiet", TenantLimits()),
        ("noisy", TenantLimits(requests_per_s=50, max_concurrent_generations=2)),
        ("bursty", TenantLimits(requests_per_s=5)),
    ]:
        registry.create_tenant(name, limits)
        keys[name] = {"Authorization": f"Bearer {registry.create_key(name)[1]}"}
    base = tiny_llama(seed=7)
    store.put("quiet", "q", random_adapter(base, 1))
    store.put("noisy", "n", random_adapter(base, 2))
    app = create_app(
        api_settings(admin_key=ADMIN_KEY, max_batch_size=4, max_queue=8),
        model=tiny_llama(seed=7),
        tokenizer=chat_tokenizer(),
        store=store,
        tenants=registry,
    )
    quiet_body = {"model": "q", "prompt": "quiet", "max_tokens": 24, "temperature": 0}
    noisy_spec = {
        "method": "POST",
        "path": "/v1/completions",
        "json": {"model": "n", "prompt": "noisy", "max_tokens": 24, "temperature": 0},
        "headers": keys["noisy"],
    }

    def quiet_latencies(client: httpx.Client, n: int = 10) -> list[float]:
        out = []
        for _ in range(n):
            start = time.monotonic()
            r = client.post("/v1/completions", json=quiet_body, headers=keys["quiet"])
            out.append(time.monotonic() - start)
            assert r.status_code == 200, r.text
        return out

    def run(url: str) -> dict:
        services = app.state.services
        with httpx.Client(base_url=url, timeout=60) as client:
            # Rate limit under concurrency: 5/s with bursts of 2 s worth = 10 at once.
            burst = load_from_another_process(
                url, "gather", [{"method": "GET", "path": "/v1/models", "headers": keys["bursty"]}] * 50
            )
            granted = sum(r["status"] == 200 for r in burst["results"])
            assert {r["status"] for r in burst["results"]} <= {200, 429}
            assert 10 <= granted <= 10 + 5 * burst["wall"] + 1, (granted, burst["wall"])
            assert all(r["type"] == "rate_limited" for r in burst["results"] if r["status"] == 429)

            quiet_latencies(client, 2)  # warm up: both adapters composed
            client.post("/v1/completions", json=noisy_spec["json"], headers=keys["noisy"])
            alone = quiet_latencies(client)

            peak, done = 0, threading.Event()

            def watch() -> None:
                nonlocal peak
                while not done.wait(0.002):
                    peak = max(peak, services.generations.active("noisy"))

            watcher = threading.Thread(target=watch)
            watcher.start()
            noisy: dict = {}
            hammer = threading.Thread(
                target=lambda: noisy.update(
                    load_from_another_process(url, "hammer", [noisy_spec], concurrency=16, seconds=NOISY_SECONDS)
                )
            )
            hammer.start()
            time.sleep(1.0)  # the loader process starts and the noisy tenant is at it
            contended = quiet_latencies(client)
            hammer.join()
            done.set()
            watcher.join()
        return dict(alone=alone, contended=contended, noisy=noisy, peak=peak, granted=granted, burst=burst["wall"])

    with serve_in_thread(app) as url:
        m = run(url)
    registry.close()
    store.close()
    noisy = Counter(r["status"] if r["status"] != 429 else f"429 {r['type']}" for r in m["noisy"]["results"])
    assert set(noisy) <= {200, "429 rate_limited"}, noisy
    assert m["peak"] <= 2, m["peak"]  # never more than its 2 concurrent generations
    assert noisy["429 rate_limited"] > 0 and noisy[200] > 0, noisy
    # and never more than its rate: 50/s plus a burst of 2 s worth
    assert sum(noisy.values()) - noisy["429 rate_limited"] <= 50 * (m["noisy"]["wall"] + 2) + 1
    alone, contended = statistics.median(m["alone"]), statistics.median(m["contended"])
    # The noisy tenant holds at most 2 of the 4 rows and its refusals are cheap: the quiet
    # tenant's requests at worst share the batch with it.
    assert contended < 4 * alone + 0.2, (alone, contended)
    print(
        f"\ntenants: bursty 50 concurrent GETs at 5/s -> {m['granted']} granted in {m['burst']:.2f} s; quiet "
        f"tenant median latency alone {alone * 1000:.0f} ms, beside the noisy one {contended * 1000:.0f} ms "
        f"(x{contended / alone:.2f}); noisy tenant (16 loops, {m['noisy']['wall']:.1f} s): {dict(noisy)}, "
        f"peak concurrent generations {m['peak']}"
    )


def test_a_hung_redis_costs_one_timeout_then_fails_fast(tmp_path) -> None:
    """Redis paused (SIGSTOP: connections stay open, nothing answers) is worse than Redis
    gone: every call waits for the client's 5 s timeout. After the first timeouts the
    store and the tenant registry fail fast (server/vbserve/backends/breaker.py), so cached adapters
    are served at once again and the rest get 503 at once; resumed, it recovers."""
    with private_redis(tmp_path) as rds:
        settings = api_settings(store_url=rds.url, admin_key=ADMIN_KEY, training_enabled=False)
        app = create_app(settings, model=tiny_llama(seed=7), tokenizer=chat_tokenizer())
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            assert c.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin).status_code == 201
            key = c.post("/v1/admin/tenants/acme/keys", headers=admin).json()["key"]
            c.headers["Authorization"] = f"Bearer {key}"
            for i in range(2):
                r = c.put(
                    f"/v1/adapters/a{i}", content=encode_adapter(random_adapter(tiny_llama(seed=7), i)), headers=OCTET
                )
                assert r.status_code == 201, r.text
            assert c.post("/v1/completions", json={"model": "a0", **SHORT}).status_code == 200
            cached = {"method": "POST", "path": "/v1/completions", "json": {"model": "a0", **SHORT},
                      "headers": {"Authorization": f"Bearer {key}"}}  # fmt: skip

            rds.proc.send_signal(signal.SIGSTOP)
            try:
                first = load_from_another_process(url, "gather", [cached] * 20)  # meets the timeouts
                then = load_from_another_process(url, "gather", [cached] * 20)  # breaker open
                start = time.monotonic()
                ready = c.get("/readyz")
                ready_s = time.monotonic() - start
                start = time.monotonic()
                uncached = c.post("/v1/completions", json={"model": "a1", **SHORT})
                uncached_s = time.monotonic() - start
            finally:
                rds.proc.send_signal(signal.SIGCONT)
            resumed = time.monotonic()
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() - resumed < 10, "did not recover after Redis resumed"
                time.sleep(0.05)
            recovered_s = time.monotonic() - resumed
            assert c.post("/v1/completions", json={"model": "a1", **SHORT}).status_code == 200

    assert all(r["status"] == 200 for r in first["results"] + then["results"])
    first_lat = [r["latency"] for r in first["results"]]
    then_lat = [r["latency"] for r in then["results"]]
    assert max(first_lat) < 2 * 5.0 + 3.0, max(first_lat)  # registry and store: one timeout each at most
    assert max(then_lat) < 2.0, max(then_lat)
    assert ready.status_code == 503 and ready_s < 1.0, ready_s
    assert uncached.status_code == 503 and uncached.headers["retry-after"] == "5" and uncached_s < 1.0, uncached_s
    print(
        f"\nhung redis: 20 concurrent cached requests first took {min(first_lat):.2f}-{max(first_lat):.2f} s "
        f"(the 5 s client timeout), the next 20 {min(then_lat):.2f}-{max(then_lat):.2f} s; /readyz 503 in "
        f"{ready_s * 1000:.0f} ms, uncached adapter 503 in {uncached_s * 1000:.0f} ms; ready {recovered_s:.2f} s "
        f"after Redis resumed"
    )
