"""The plumbing every stateful component shares: where a backend lives (one URL parser),
how to reach it (the Redis client, SQLite connections), how its keys look, how it fails
(`BackendUnavailableError`, the circuit breaker) and its lifecycle (`Backend`).

The lowest layer: imports nothing else from `server` nor from `adapter_store` (which
builds on it, as do the tenant registry and the training job queue and file store).
"""

from .base import Backend
from .breaker import CircuitBreaker
from .errors import BackendInputError, BackendUnavailableError, FieldError
from .keys import validate_key
from .redis_client import REDIS_UNAVAILABLE_ERRORS, redis_client
from .sqlite_db import SQLiteDatabase
from .urls import BackendURL, parse_backend_url

__all__ = [
    "REDIS_UNAVAILABLE_ERRORS",
    "Backend",
    "BackendInputError",
    "BackendURL",
    "BackendUnavailableError",
    "CircuitBreaker",
    "FieldError",
    "SQLiteDatabase",
    "parse_backend_url",
    "redis_client",
    "validate_key",
]
