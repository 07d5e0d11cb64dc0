"""Tenant, adapter, job and file names become parts of Redis keys and SQL values: one
safe alphabet for all of them, checked once here."""

from __future__ import annotations

import re

from .errors import BackendInputError, FieldError

MAX_KEY_LENGTH = 128
# No separators (`/`, `:`), no braces (Redis Cluster hash tags), no leading dot (hidden files).
_KEY_ALPHABET = re.compile(r"[A-Za-z0-9._-]+")


def validate_key(field: str, value: object, *, error: type[FieldError] = BackendInputError) -> str:
    """Return `value` if it is a safe key, else raise `error(field, reason)` (a caller
    passes its own error type, so a bad adapter name stays an adapter error)."""
    if not isinstance(value, str):
        raise error(field, f"must be a string, got {type(value).__name__}")
    if not value:
        raise error(field, "must not be empty")
    if len(value) > MAX_KEY_LENGTH:
        raise error(field, f"{len(value)} characters exceed the limit of {MAX_KEY_LENGTH}")
    if not _KEY_ALPHABET.fullmatch(value):
        raise error(field, "only letters, digits, '.', '_' and '-' are allowed")
    if value.startswith("."):
        raise error(field, "must not start with '.'")
    return value
