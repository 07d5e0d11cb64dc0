"""ASGI middleware of the API: a body-size limit on every request, and one structured log
line per request with its request id."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

access_log = logging.getLogger("vbserve.access")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class BodyLimitMiddleware:
    """Refuse a body over the limit that `limit_for(method, path)` gives, with 413: from
    Content-Length before anything is read, or as soon as a chunked body passes it. So no
    route ever holds more than its limit in memory; routes that take uploads get the
    larger limits they check themselves, everything else the JSON limit.

    (Starlette's `RequestBodyLimitMiddleware` does the counting too, but replaces any
    response to an oversized request with its own plain-text one, so our JSON error body
    would never reach the client.)"""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await body_too_large(limit).response()(scope, receive, send)
            return
        received = 0

        async def receive_at_most_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route's body read; an HTTPException is what FastAPI's
                    # body parsing lets through to the API's error handler.
                    raise HTTPException(413, body_too_large(limit).message)
            return message

        await self.app(scope, receive_at_most_limit, send)


def body_too_large(limit: int) -> APIError:
    return APIError("too_large", f"the request body exceeds this route's limit of {limit} bytes", "body")


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
