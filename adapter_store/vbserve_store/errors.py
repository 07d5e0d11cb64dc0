"""Typed errors of the adapter layer. Each names the field at fault and why, so the HTTP
layer can turn it into a 4xx body without parsing messages."""

from __future__ import annotations

from vbserve.backends import BackendUnavailableError, FieldError


class AdapterError(FieldError):
    """Base of every error this package raises on bad input or missing data."""

    kind = "invalid_adapter"


class AdapterValidationError(AdapterError, ValueError):
    """The adapter's content breaks a rule (shape, range, dtype, finiteness)."""


class AdapterFormatError(AdapterValidationError):
    """The bytes are not a well-formed adapter blob or PEFT checkpoint."""

    kind = "invalid_format"


class AdapterTooLargeError(AdapterValidationError):
    """A size limit is exceeded."""

    kind = "too_large"


class IncompatibleBaseModelError(AdapterValidationError):
    """The adapter targets modules the base model lacks, or with other shapes."""

    kind = "incompatible_base_model"


class AdapterNotFoundError(AdapterError, KeyError):
    kind = "not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return f"{self.field}: {self.reason}"


class BankNotFoundError(AdapterNotFoundError):
    """A blob names a bank by hash that the receiver does not hold."""


class VersionConflictError(AdapterError):
    """A conditional write expected another version than the stored one."""

    kind = "conflict"


class QuotaExceededError(AdapterError):
    """Publishing would take the tenant over its limit on adapters stored or bytes stored."""

    kind = "quota_exceeded"


class StoreUnavailableError(AdapterError, BackendUnavailableError):
    """The adapter store cannot be reached; retry later. The store's own type, so a
    caller of the store catches one error from its API."""

    kind = "unavailable"
