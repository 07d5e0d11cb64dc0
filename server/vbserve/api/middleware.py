"""Everything around the routes, installed by `install_middleware`: one structured log line
per request with its request id, Prometheus counts and times per route, and the error
handlers (`errors`) that turn every exception into the API's JSON error body.

Body limits are not here: each route declares its own (`body_limits`), since only the
route knows how large a body it takes."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vbserve.metrics import Metrics

from .errors import install_error_handlers

access_log = logging.getLogger("vbserve.access")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def install_middleware(app: FastAPI, metrics: Metrics) -> None:
    """The middleware and error handlers of every route. Outermost last: the request log
    sees every response, also a 413 or a crash."""
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestLogMiddleware)
    install_error_handlers(app)


class RequestLogMiddleware:
    """Give every request an id (the client's `X-Request-ID` when well-formed, else a new
    one), return it in the response header, and log one JSON line when the request ends:
    id, method, path, status, duration, tenant. Headers, query strings and bodies are never
    logged: they carry keys and prompts."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500  # what the client sees if the app fails before responding

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.info(
                json.dumps(
                    {
                        "event": "request",
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                        "tenant": scope["state"].get("tenant"),
                    },
                    separators=(",", ":"),
                )
            )


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _CLIENT_REQUEST_ID.fullmatch(candidate):
                return candidate
    return uuid.uuid4().hex


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (`/v1/adapters/{name}`,
    not the concrete path: that would name adapters, and grow without bound)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app fails before sending a response

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            # The router writes the matched route into this same scope dict.
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(path, scope["method"], status, time.perf_counter() - start)
