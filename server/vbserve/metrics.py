"""Prometheus metrics of one app: HTTP traffic, generation, the engine's queue, the
adapter cache and the adapter store.

Every app owns its own `CollectorRegistry` (not the process-global one), so tests can
build many apps in one process and each scrape shows only its own app.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vbserve.engine import FinalResult

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_COMPOSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, *, max_lora: int = 0, adapter_names: bool = False) -> None:
        """max_lora: the engine's adapter slots, reported like vLLM's `max_lora`.
        adapter_names: show which adapters (tenant/name) are in use; off by default, as a
        scrape must not tell anyone which tenants exist or what they named their adapters."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "vbserve_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "vbserve_http_request_duration_seconds",
            "Time from request to the end of the response (a stream counts whole)",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "vbserve_time_to_first_token_seconds",
            "Time from engine submission to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.generations = Counter(
            "vbserve_generations", "Finished generations by finish reason", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("vbserve_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.generated_tokens = Counter("vbserve_generated_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("vbserve_queue_length", "Requests submitted and not yet running", registry=r)
        self.running = Gauge("vbserve_running_requests", "Requests in the running batch", registry=r)
        # Shaped like vLLM's `vllm:lora_requests_info`: one series whose labels list the
        # adapters (tenant/name) of running and waiting requests, or nothing unless the
        # operator opted in to names; its value is when they last changed. Only the
        # current label set is kept, so cardinality stays at one.
        self.lora_requests_info = Gauge(
            "vbserve_lora_requests_info",
            "Adapters in use: running_lora_adapters and waiting_lora_adapters (comma-separated tenant/name; "
            "empty unless VBSERVE_METRICS_ADAPTER_NAMES)",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        self.lora_adapters = Gauge(
            "vbserve_lora_adapters", "Distinct adapters of running and of waiting requests", ["state"], registry=r
        )
        self._lora_names: tuple[str, str] | None = None
        self.max_lora = max_lora
        self.adapter_names = adapter_names
        self.adapter_cache_hits = Counter(
            "vbserve_adapter_cache_hits", "Requests whose adapter was already composed", registry=r
        )
        self.adapter_cache_misses = Counter(
            "vbserve_adapter_cache_misses", "Requests whose adapter had to be loaded and composed", registry=r
        )
        self.adapter_cache_evictions = Counter(
            "vbserve_adapter_cache_evictions", "Composed adapters evicted from the cache", registry=r
        )
        self.adapter_cache_bytes = Gauge(
            "vbserve_adapter_cache_bytes", "Bytes of composed adapter matrices held in the cache", registry=r
        )
        self.compose_seconds = Histogram(
            "vbserve_adapter_compose_seconds",
            "Time of one batched composition of adapters",
            buckets=_COMPOSE_BUCKETS,
            registry=r,
        )
        self.store_seconds = Histogram(
            "vbserve_store_operation_seconds",
            "Time the adapter store took per operation (put, get, get_version, ...)",
            ["operation"],
            buckets=_COMPOSE_BUCKETS,
            registry=r,
        )
        self._adapter_events: dict[str, Callable[[float], None]] = {
            "hit": self.adapter_cache_hits.inc,
            "miss": self.adapter_cache_misses.inc,
            "eviction": self.adapter_cache_evictions.inc,
            "compose_seconds": self.compose_seconds.observe,
        }

    # -- engine callbacks (called on the engine and adapter-loader threads) -------------

    def on_step(self, stats: dict) -> None:
        self.queue_length.set(stats["waiting"])
        self.running.set(stats["running"])
        running, waiting = stats["running_adapters"], stats["waiting_adapters"]
        self.lora_adapters.labels("running").set(len(running))
        self.lora_adapters.labels("waiting").set(len(waiting))
        names = (",".join(running), ",".join(waiting))
        if names != self._lora_names:
            self._lora_names = names
            self.lora_requests_info.clear()
            shown = names if self.adapter_names else ("", "")
            self.lora_requests_info.labels(*shown, str(self.max_lora)).set(time.time())

    def on_adapter_event(self, kind: str, value: float) -> None:
        record = self._adapter_events.get(kind)
        if record is not None:
            record(value)

    def on_store_operation(self, operation: str, seconds: float) -> None:
        self.store_seconds.labels(operation).observe(seconds)

    def watch_cached_bytes(self, read: Callable[[], int]) -> None:
        """Read the adapter cache's size at scrape time (the cache changes it under its lock)."""
        self.adapter_cache_bytes.set_function(read)

    # -- API-layer observations ---------------------------------------------------------

    def observe_result(self, result: FinalResult) -> None:
        self.generations.labels(result.finish_reason).inc()
        self.prompt_tokens.inc(result.usage.prompt_tokens)
        self.generated_tokens.inc(result.usage.completion_tokens)
        if result.time_to_first_token_s is not None:
            self.time_to_first_token.observe(result.time_to_first_token_s)

    def observe_abandoned(self) -> None:
        """A client went away mid-generation; the engine request was cancelled."""
        self.generations.labels("cancelled").inc()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        # The method is the client's to choose (h11 takes any token): one series per
        # made-up method would grow without bound.
        method = method if method in _HTTP_METHODS else "other"
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_latency.labels(route, method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
