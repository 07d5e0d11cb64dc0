"""The errors every backend shares. Each names the field (or backend) at fault and why,
with a stable `kind` that the HTTP layer (`server/vbserve/api/errors.py`) maps to a status, so no
route parses messages. The adapter store's, the trainer's and tenancy's errors derive
from `FieldError`, so one handler serves them all."""

from __future__ import annotations


class FieldError(Exception):
    """An error about one field of some input: which field, why, and a stable `kind` that
    the HTTP layer maps to a status."""

    kind = "invalid_request"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class BackendInputError(FieldError, ValueError):
    """A key or a backend URL that no backend accepts; `field` names it (`name`,
    `jobs_url`, ...)."""


class BackendUnavailableError(FieldError):
    """A backend cannot be reached (or is closed); retry later. `field` names the
    backend: "store", "jobs", "files", "tenants", or the setting whose URL no node
    answers at."""

    kind = "unavailable"

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(backend, reason)

    @property
    def backend(self) -> str:
        return self.field
