"""The adapter store interface that every backend implements, and the rules they share.

The public methods live here, once: they validate the caller's input and encode/decode
adapters, then call a backend's protected `_` methods with plain bytes and strings. So
both backends reject exactly the same input before touching storage (bad input can
never leave a half-written store) and only storage differs between them.

Storage model, common to every backend:
- An adapter is stored as its body (`encode_adapter(include_bank=False)`, which names
  its bank by id) plus a record; the bank is stored once per `bank_id` (content
  addressed, global across tenants) with a reference count, and removed when the last
  adapter that uses it is replaced or deleted. A plain LoRA adapter has no bank: its
  body is its whole blob (`encode_lora`) and its bank id is "" (backends skip the bank).
- Versions grow per (tenant, name) from 1 and a counter survives delete, so a cache
  keyed by (tenant, name, version) never takes a new adapter for an old one.
- Only the latest version's bytes are kept.
- Every backend indexes which banks each tenant's adapters use, updated in the same
  atomic step as a put or delete, so `tenant_uses_bank` (may this tenant read a bank, or
  name it in an upload) is one lookup however many adapters the tenant has.
"""

from __future__ import annotations

import json
import re
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from vbserve.backends import Backend, validate_key

from ..adapter import VBLoRAAdapter
from ..codec import attach_bank, decode_adapter, decode_bank, encode_adapter, encode_bank
from ..errors import (
    AdapterNotFoundError,
    AdapterValidationError,
    BankNotFoundError,
    QuotaExceededError,
    StoreUnavailableError,
)
from ..lora import LoRAAdapter, decode_lora, encode_lora

MAX_LIST_LIMIT = 1000
_BANK_ID = re.compile(r"sha256-[0-9a-f]{40}")


@dataclass(frozen=True)
class StoreQuota:
    """A tenant's limits, checked by `put` in the same atomic step as the write, so
    concurrent pushes cannot together overshoot them. None = no limit."""

    max_adapters: int | None = None
    max_bytes: int | None = None  # sum of `stored_bytes` over the tenant's adapters


def quota_exceeded(what: str, quota: StoreQuota) -> QuotaExceededError:
    if what == "adapters":
        return QuotaExceededError("name", f"the tenant already stores its limit of {quota.max_adapters} adapters")
    return QuotaExceededError("adapter", f"storing it would exceed the tenant's limit of {quota.max_bytes} bytes")


@dataclass(frozen=True)
class AdapterRecord:
    """Metadata of the stored version of one adapter (no tensors).

    body_bytes: size of the stored body (indices + weights + metadata).
    bank_bytes: size of the stored bank blob. It is charged to every adapter that uses the
                bank, so a tenant's byte count does not depend on what others store.
    created:    unix time of the first put since the name was last absent.
    updated:    unix time of this version's put.
    """

    tenant: str
    name: str
    version: int
    bank_id: str
    config: dict[str, Any]
    body_bytes: int
    bank_bytes: int
    created: float
    updated: float

    @property
    def stored_bytes(self) -> int:
        return self.body_bytes + self.bank_bytes


Records = list[AdapterRecord]


def check_key(field: str, value: object) -> str:
    """A tenant or adapter name that is safe as a storage key, else `AdapterValidationError`."""
    return validate_key(field, value, error=AdapterValidationError)


def not_found(tenant: str, name: str) -> AdapterNotFoundError:
    return AdapterNotFoundError("name", f"no adapter {name!r} for tenant {tenant!r}")


Adapter = VBLoRAAdapter | LoRAAdapter


def encode_for_store(adapter: object) -> tuple[str, str, bytes, bytes]:
    """(bank_id, config JSON, body, bank blob) of what a backend stores for `adapter`;
    a LoRA adapter has no bank ("" and b"")."""
    if isinstance(adapter, LoRAAdapter):
        return "", json.dumps(adapter.config.to_json(), separators=(",", ":")), encode_lora(adapter), b""
    if not isinstance(adapter, VBLoRAAdapter):
        raise AdapterValidationError("adapter", f"must be a VBLoRAAdapter or LoRAAdapter, got {type(adapter).__name__}")
    config = json.dumps(adapter.config.to_json(), separators=(",", ":"))
    body = encode_adapter(adapter, include_bank=False)
    return adapter.bank_id, config, body, encode_bank(adapter.bank, adapter.bank_id)


def validate_bank_id(bank_id: object) -> str:
    if not isinstance(bank_id, str) or not _BANK_ID.fullmatch(bank_id):
        raise AdapterValidationError("bank_id", "must look like 'sha256-' followed by 40 hex digits")
    return bank_id


class AdapterStore(Backend):
    """Where adapters live, per tenant. Synchronous and thread-safe: the server calls it
    from worker threads. Every method may raise `StoreUnavailableError`; `ping`, `close`,
    the context manager and the guard around each storage call come from `Backend`."""

    backend = "store"
    description = "adapter store"
    unavailable_error = StoreUnavailableError

    # -- public API --------------------------------------------------------------------

    def put(
        self,
        tenant: str,
        name: str,
        adapter: Adapter,
        *,
        expected_version: int | None = None,
        quota: StoreQuota | None = None,
    ) -> AdapterRecord:
        """Publish `adapter` as the next version of (tenant, name), atomically.

        expected_version: None writes unconditionally; 0 writes only if the name is absent;
        n writes only if the stored version is n. Otherwise `VersionConflictError`, and
        nothing changes.
        quota: the tenant's limits after this write (a new name counts one more adapter;
        a replacement counts its size difference). Over them: `QuotaExceededError`, and
        nothing changes. A replacement that shrinks is always allowed.
        """
        check_key("tenant", tenant)
        check_key("name", name)
        bank_id, config, body, bank = encode_for_store(adapter)
        if expected_version is not None and (
            not isinstance(expected_version, int) or isinstance(expected_version, bool) or expected_version < 0
        ):
            raise AdapterValidationError(
                "expected_version", f"must be None or an integer >= 0, got {expected_version!r}"
            )
        with self._guard("put"):
            return self._put(
                tenant, name, expected_version, bank_id, config, body, bank, time.time(), quota or StoreQuota()
            )

    def get(self, tenant: str, name: str) -> tuple[AdapterRecord, Adapter]:
        """The stored version's record and adapter, read as one consistent pair."""
        check_key("tenant", tenant)
        check_key("name", name)
        with self._guard("get"):
            record, body, bank_blob = self._read(tenant, name)
        if not record.bank_id:
            # A stored body passed the size limit of the upload that stored it.
            return record, decode_lora(body, max_bytes=len(body))
        bank = decode_bank(bank_blob, verify=False)  # decode_adapter checks it against the body's bank id
        adapter = decode_adapter(body, bank_resolver=lambda bank_id: bank if bank_id == record.bank_id else None)
        return record, adapter

    def get_blob(self, tenant: str, name: str, *, include_bank: bool = True) -> tuple[AdapterRecord, bytes]:
        """The stored version's record and its blob as `encode_adapter` (or `encode_lora`)
        gives it, read as one consistent pair: the stored bytes, with the bank put back in
        if asked, and no adapter decoded or validated on the way (downloads need none)."""
        check_key("tenant", tenant)
        check_key("name", name)
        with self._guard("get_blob"):
            record, body, bank_blob = self._read(tenant, name)
        if record.bank_id and include_bank:
            return record, attach_bank(body, bank_blob)
        return record, body

    def get_record(self, tenant: str, name: str) -> AdapterRecord:
        """Metadata only: no tensor is read or decoded."""
        check_key("tenant", tenant)
        check_key("name", name)
        with self._guard("get_record"):
            return self._get_record(tenant, name)

    def get_version(self, tenant: str, name: str) -> int | None:
        """The stored version, or None if absent: one cheap lookup, for cache invalidation."""
        check_key("tenant", tenant)
        check_key("name", name)
        with self._guard("get_version"):
            return self._get_version(tenant, name)

    def list(self, tenant: str, *, after: str | None = None, limit: int = 100) -> Records:
        """One page of the tenant's adapters in name order (byte order), names > `after`.
        Pass the last name of a page as `after` to get the next page."""
        check_key("tenant", tenant)
        if after is not None:
            check_key("after", after)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise AdapterValidationError("limit", f"must be an integer in [1, {MAX_LIST_LIMIT}], got {limit!r}")
        with self._guard("list"):
            return self._list(tenant, after, limit)

    def count(self, tenant: str) -> tuple[int, int]:
        """(number of adapters, sum of their `stored_bytes`), for quotas."""
        check_key("tenant", tenant)
        with self._guard("count"):
            return self._count(tenant)

    def delete(self, tenant: str, name: str) -> None:
        """Remove the adapter (`AdapterNotFoundError` if absent) and release its bank."""
        check_key("tenant", tenant)
        check_key("name", name)
        with self._guard("delete"):
            self._delete(tenant, name)

    def get_bank(self, bank_id: str) -> bytes:
        """The bank blob (`encode_bank` format). Banks are global and content addressed:
        whether a caller may read one is the HTTP layer's decision."""
        validate_bank_id(bank_id)
        with self._guard("get_bank"):
            blob = self._get_bank(bank_id)
        if blob is None:
            raise BankNotFoundError("bank_id", f"bank {bank_id!r} is not stored")
        return blob

    def tenant_uses_bank(self, tenant: str, bank_id: object) -> bool:
        """Whether one of the tenant's adapters uses the bank: one lookup in an index the
        backend keeps with every put and delete, so its cost does not grow with the
        tenant's adapters. Banks are global and content addressed; a tenant may read (or
        reference in an upload) only a bank that one of its own adapters uses, so a bank
        id learnt elsewhere reveals nothing. A string that is no bank id: False."""
        check_key("tenant", tenant)
        if not isinstance(bank_id, str) or not _BANK_ID.fullmatch(bank_id):
            return False
        with self._guard("tenant_uses_bank"):
            return self._tenant_uses_bank(tenant, bank_id)

    def has_bank(self, bank_id: str) -> bool:
        validate_bank_id(bank_id)
        with self._guard("has_bank"):
            return self._has_bank(bank_id)

    # -- what a backend implements (arguments already validated) --------------------------

    @abstractmethod
    def _put(
        self,
        tenant: str,
        name: str,
        expected_version: int | None,
        bank_id: str,
        config_json: str,
        body: bytes,
        bank: bytes,
        now: float,
        quota: StoreQuota,
    ) -> AdapterRecord:
        """Atomically: check the version and the quota, store body + record, take a
        reference on the bank (storing it if new), release the replaced version's bank.
        Bank id "" (a LoRA adapter): there is no bank to reference, nor to release."""

    @abstractmethod
    def _read(self, tenant: str, name: str) -> tuple[AdapterRecord, bytes, bytes]:
        """(record, body, bank blob) of one version, never parts of two versions; b"" for
        the bank of an adapter without one (bank id "")."""

    @abstractmethod
    def _get_record(self, tenant: str, name: str) -> AdapterRecord: ...

    @abstractmethod
    def _get_version(self, tenant: str, name: str) -> int | None: ...

    @abstractmethod
    def _list(self, tenant: str, after: str | None, limit: int) -> Records: ...

    @abstractmethod
    def _count(self, tenant: str) -> tuple[int, int]: ...

    @abstractmethod
    def _delete(self, tenant: str, name: str) -> None: ...

    @abstractmethod
    def _tenant_uses_bank(self, tenant: str, bank_id: str) -> bool: ...

    @abstractmethod
    def _get_bank(self, bank_id: str) -> bytes | None: ...

    @abstractmethod
    def _has_bank(self, bank_id: str) -> bool: ...
