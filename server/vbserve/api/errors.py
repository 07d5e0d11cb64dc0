"""Every error the API returns, in one place: `{"error": {"type", "message", "field"}}`
with the status that its type implies.

Routes raise `APIError`, or let adapter-store and engine errors propagate: their stable
`kind` picks the status here, so no route maps errors itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vbserve.backends import FieldError
from vbserve.engine import EngineError

from .schemas.common import NOT_SUPPORTED

log = logging.getLogger(__name__)

# Seconds a client should wait before retrying: a full queue drains in about a second, a
# store outage takes longer to heal.
RETRY_AFTER_OVERLOADED = 1
RETRY_AFTER_UNAVAILABLE = 5

# Public error types (what clients switch on) and their statuses.
STATUS = {
    "invalid_request": 400,
    "incompatible_adapter": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "too_large": 413,
    "unsupported_media_type": 415,
    "overloaded": 429,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "internal_error": 500,
    "unavailable": 503,
}

# `FieldError.kind` (store, trainer, tenancy) and engine `EngineError.kind` -> public type.
_KIND_TO_TYPE = {
    "invalid_adapter": "invalid_request",
    "invalid_format": "invalid_request",
    "invalid_request": "invalid_request",
    "incompatible_base_model": "incompatible_adapter",
    "incompatible": "incompatible_adapter",
    "not_found": "not_found",
    "conflict": "conflict",
    "too_large": "too_large",
    "overloaded": "overloaded",
    "quota_exceeded": "quota_exceeded",
    "unavailable": "unavailable",
    "engine_error": "internal_error",
}


class APIError(Exception):
    def __init__(self, type: str, message: str, field: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.field = field
        self.status = status or STATUS[type]

    @property
    def headers(self) -> dict[str, str]:
        if self.type in ("overloaded", "rate_limited"):
            return {"Retry-After": str(RETRY_AFTER_OVERLOADED)}
        if self.type == "unauthorized":
            return {"WWW-Authenticate": "Bearer"}
        if self.type == "unavailable":
            return {"Retry-After": str(RETRY_AFTER_UNAVAILABLE)}
        return {}

    def body(self) -> dict:
        return {"error": {"type": self.type, "message": self.message, "field": self.field}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# What a client reads when a backing service is down. The driver's own message names the
# service's host and port (`Error 111 connecting to 10.0.0.5:6379`), which is nobody's
# business outside: it goes to the server log instead.
UNAVAILABLE_MESSAGE = "a backing service (store, tenant registry or job queue) is unreachable; retry later"


def from_typed_error(exc: FieldError) -> APIError:
    """The store's, the trainer's and tenancy's errors: each has `field`, `reason` and a `kind`."""
    type_ = _KIND_TO_TYPE.get(exc.kind, "invalid_request")
    return APIError(type_, _public_message(type_, str(exc.reason), exc.field), exc.field)


def from_engine_error(exc: EngineError, field_names: Mapping[str, str] | None = None) -> APIError:
    """`field_names` renames the engine's fields (`max_new_tokens`, `prompt`, `model`) to
    the names of the API the client called (`max_tokens`, `messages`, ...)."""
    field = (field_names or {}).get(exc.field, exc.field)
    kind = _KIND_TO_TYPE.get(exc.kind, "internal_error")
    return APIError(kind, _public_message(kind, exc.message, field), field)


def _public_message(type_: str, message: str, field: str | None) -> str:
    if type_ != "unavailable":
        return message
    log.warning("%s unavailable: %s", field, message)
    return UNAVAILABLE_MESSAGE


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(FieldError, _typed_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _typed_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FieldError)
    return from_typed_error(exc).response()


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    return from_engine_error(exc).response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """Malformed JSON is a 400; so is a field the schema does not know or a value it
    does not implement, naming that field by its dotted path (`parameters.best_of`).
    Well-formed JSON with wrong types or values is a 422 that names the first offending
    field (`messages.0.content`)."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    if first["type"] == "json_invalid":
        return APIError("invalid_request", f"body is not valid JSON: {first['msg']}", "body").response()
    refused = next((e for e in errors if e["type"] in _REFUSED_FIELD_TYPES), None)
    if refused is not None:
        field = _dotted(tuple(refused["loc"]))
        if refused["type"] == "extra_forbidden":
            message = (
                f"unknown field {field}: this server does not implement it (unknown fields are refused, not ignored)"
            )
        else:
            message = f"{field}: {refused['msg']}"
        return APIError("invalid_request", message, field).response()
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
    return APIError("invalid_request", message, field_of(errors), status=422).response()


# Pydantic error types that refuse a field rather than its type: a field the schema does
# not know (`extra="forbid"`), a value it does not implement (`schemas.common.NOT_SUPPORTED`).
_REFUSED_FIELD_TYPES = ("extra_forbidden", NOT_SUPPORTED)


def field_of(errors: Sequence[Mapping]) -> str:
    """The dotted field (`messages.0.content`) that pydantic's first error is about."""
    if not errors:
        return "body"
    # A value that fits no member of a union (`prompt: str | list[str]`) gives one error
    # per member, each loc ending in the member's name; the field is their common prefix.
    loc = tuple(errors[0]["loc"])
    for e in errors[1:]:
        if tuple(e["loc"][:2]) == loc[:2]:
            loc = _common_prefix(loc, tuple(e["loc"]))
    return _dotted(loc)


def _dotted(loc: tuple) -> str:
    """`("body", "parameters", "best_of")` -> `parameters.best_of`."""
    parts = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    return ".".join(map(str, parts)) or "body"


def _common_prefix(a: tuple, b: tuple) -> tuple:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "invalid_request")
    # FastAPI's own 400 is "There was an error parsing the body": bytes that are not UTF-8
    # (a gzip-encoded body, which is never inflated), JSON nested past the parser's depth.
    message = str(exc.detail)
    if message == "There was an error parsing the body":
        message = "the body is not valid UTF-8 JSON (or nests too deep)"
    error = APIError(kind, message, "body" if exc.status_code in (400, 413) else None, status=exc.status_code)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises the exception after this response, so the server logs it once.
    return APIError("internal_error", "internal server error").response()
