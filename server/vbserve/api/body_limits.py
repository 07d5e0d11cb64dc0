"""Request-body limits, declared by each route: a route that takes an upload says so with
`@body_limit(...)` under its route decorator; every other route gets the JSON limit.
`BodyLimitedRoute`, the route class of every router, enforces the limit: a body over it
is refused with 413, from Content-Length before anything is read, or as soon as a chunked
body passes it. So no route ever holds more than its limit in memory; the upload routes
then check each file themselves, naming its field.

Limits are functions of the app's `Settings` (read at each request from `app.state`), not
numbers: routes are declared once at import, and each app has its own settings.

(FastAPI's `max_body_size` takes a number fixed when the route is declared, and
Starlette's `RequestBodyLimitMiddleware` under it answers an oversized Content-Length with
its own plain-text 413, so our JSON error body would never reach the client.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive

from vbserve.settings import Settings

from .errors import APIError

BodyLimit = Callable[[Settings], int]
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

# Room for multipart boundaries and part headers around an uploaded file.
MULTIPART_SLACK = 64 << 10


def json_body_limit(settings: Settings) -> int:
    return settings.max_request_bytes


def adapter_upload_limit(settings: Settings) -> int:
    return settings.max_adapter_bytes + MULTIPART_SLACK


def training_upload_limit(settings: Settings) -> int:
    return 2 * settings.training_max_file_bytes + MULTIPART_SLACK  # training + validation file


def file_upload_limit(settings: Settings) -> int:
    return settings.training_max_file_bytes + MULTIPART_SLACK


def body_limit(limit: BodyLimit) -> Callable[[Endpoint], Endpoint]:
    """Declare the endpoint's body limit (instead of the JSON limit); put it under the
    route decorator, so the route sees it when it is made."""

    def declare(endpoint: Endpoint) -> Endpoint:
        endpoint.body_limit = limit  # type: ignore[attr-defined]
        return endpoint

    return declare


class BodyLimitedRoute(APIRoute):
    """An APIRoute that refuses a body over its endpoint's limit (see the module)."""

    @property
    def body_limit(self) -> BodyLimit:
        return getattr(self.endpoint, "body_limit", json_body_limit)

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        limit_of = self.body_limit

        async def bounded_handler(request: Request) -> Response:
            limit = limit_of(request.app.state.settings)
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise body_too_large(limit)
            return await handler(Request(request.scope, receive_at_most(limit, request.receive)))

        return bounded_handler


def receive_at_most(limit: int, receive: Receive) -> Receive:
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

    return receive_at_most_limit


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit`, a limit
    below the route's own: an adapter blob's, or the JSON limit for a job created from
    file ids (its route takes uploads). From Content-Length before reading anything, or
    while reading a chunked body."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"{declared} bytes", limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"more than {limit} bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: str, limit: int) -> APIError:
    return APIError("too_large", f"a body of {size} exceeds the limit of {limit} bytes", "body")


def body_too_large(limit: int) -> APIError:
    return APIError("too_large", f"the request body exceeds this route's limit of {limit} bytes", "body")
