"""ASGI middleware of the API: a body-size limit on every request, and one structured log
line per request with its request id."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("vbserve.access")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class BodyLimitMiddleware:
    """Refuse a body over the limit that `limit_for(method, path)` gives, with 413: from
    Content-Length before anything is read, or as soon as a chunked body passes it. So no
    route ever holds more than its limit in memory; routes that take uploads get the
    larger limits they check themselves, everything else the JSON limit."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        await RequestBodyLimitResponder(self.app, limit)(scope, receive, send)


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
