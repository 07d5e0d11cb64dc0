"""Typed errors of fine-tuning. Like every `vbserve.backends.FieldError`, each names the field at fault
and why, and carries a stable `kind` that the HTTP layer maps to a status, so no route
parses messages."""

from __future__ import annotations

from vbserve.backends import FieldError, validate_key


class TrainingError(FieldError):
    """Base of every error this package raises on bad input or a refused request."""


class DatasetError(TrainingError):
    """A training or validation file breaks a rule; `field` names the file and line."""


class DatasetTooLargeError(DatasetError):
    """A file exceeds the byte or row limit."""

    kind = "too_large"


class HyperparameterError(TrainingError):
    """A hyperparameter is out of bounds or does not fit the base model."""


class TooManyJobsError(TrainingError):
    """The tenant already has the allowed number of queued + running jobs."""

    kind = "overloaded"


class JobNotFoundError(TrainingError):
    kind = "not_found"


class JobStateError(TrainingError):
    """The job is in a state that does not allow the operation (e.g. cancel a finished job)."""

    kind = "conflict"


class TrainingCancelled(Exception):
    """Raised inside the trainer when `should_stop()` answers True."""


class UnknownFileError(TrainingError):
    """No uploaded file of the tenant's has this id (another tenant's is as unknown)."""

    kind = "not_found"


def check_key(field_name: str, value: object) -> str:
    """`validate_key` (a tenant, adapter or worker name that is safe as a storage key),
    refusing with a `TrainingError` naming the field."""
    return validate_key(field_name, value, error=TrainingError)
