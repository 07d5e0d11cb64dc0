"""The store of uploaded files every backend implements, and the rules they share.

A file is what OpenAI's files API holds for fine-tuning: a JSONL dataset a tenant uploads
once (`POST /v1/files`) and names by id in jobs. As in `..jobs.base`, the public methods
live here once: they validate the caller's input, then call a backend's protected `_`
methods, so both backends refuse the same input and only storage differs. The tenant's
quota (files and bytes) is checked by the backend in the same atomic step as the write,
so concurrent uploads cannot together overshoot it.
"""

from __future__ import annotations

import time
import unicodedata
import uuid
from abc import abstractmethod
from dataclasses import dataclass

from vbserve.backends import Backend, BackendInputError, validate_key
from vbserve_store import QuotaExceededError

from ..errors import DatasetError, DatasetTooLargeError, TrainingError, UnknownFileError, check_key

FILE_ID_PREFIX = "file-"
MAX_LIST_LIMIT = 100
MAX_FILENAME_CHARS = 255
PURPOSES = ("fine-tune",)


@dataclass(frozen=True)
class FileRecord:
    """What a tenant sees of a file (not its content)."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created: float


@dataclass(frozen=True)
class FileLimits:
    max_file_bytes: int = 32 << 20
    max_files_per_tenant: int = 100
    max_bytes_per_tenant: int = 1 << 30


def new_file_id() -> str:
    return FILE_ID_PREFIX + uuid.uuid4().hex[:24]


def file_not_found(file_id: object) -> UnknownFileError:
    return UnknownFileError("file_id", f"no file {file_id!r}")


def validate_file_id(file_id: object) -> str:
    """An id this store could have made, else `UnknownFileError` (as if absent)."""
    if not isinstance(file_id, str) or not file_id.startswith(FILE_ID_PREFIX) or len(file_id) > 64:
        raise file_not_found(file_id)
    try:
        return validate_key("file_id", file_id)
    except BackendInputError:
        raise file_not_found(file_id) from None


def files_quota_exceeded(what: str, limits: FileLimits) -> QuotaExceededError:
    if what == "files":
        return QuotaExceededError("file", f"the tenant already stores its limit of {limits.max_files_per_tenant} files")
    return QuotaExceededError(
        "file", f"storing it would exceed the tenant's limit of {limits.max_bytes_per_tenant} bytes"
    )


class FileStore(Backend):
    """Uploaded files, per tenant. Synchronous and thread-safe. Every method may raise
    `BackendUnavailableError("files")`."""

    backend = "files"
    description = "file store"

    def __init__(self, limits: FileLimits) -> None:
        super().__init__()
        self.limits = limits

    def put(self, tenant: str, filename: str, purpose: str, content: bytes) -> FileRecord:
        """Store `content` as a new file of `tenant`. Raises `QuotaExceededError` on `file`
        past the tenant's file count or byte quota; nothing is stored then."""
        check_key("tenant", tenant)
        if purpose not in PURPOSES:
            raise TrainingError("purpose", f"must be one of {', '.join(PURPOSES)}, got {purpose!r}")
        if not isinstance(content, bytes):
            raise DatasetError("file", f"must be bytes, got {type(content).__name__}")
        if not content.strip():
            raise DatasetError("file", "contains no rows")
        if len(content) > self.limits.max_file_bytes:
            raise DatasetTooLargeError("file", f"{len(content)} bytes exceed the limit of {self.limits.max_file_bytes}")
        record = FileRecord(new_file_id(), tenant, _check_filename(filename), purpose, len(content), time.time())
        with self._guard():
            self._put(record, content)
        return record

    def get(self, tenant: str, file_id: str) -> FileRecord:
        """The file, if it belongs to `tenant` (else `UnknownFileError`, as if absent)."""
        check_key("tenant", tenant)
        validate_file_id(file_id)
        with self._guard():
            record = self._get(tenant, file_id)
        if record is None:
            raise file_not_found(file_id)
        return record

    def content(self, tenant: str, file_id: str) -> bytes:
        check_key("tenant", tenant)
        validate_file_id(file_id)
        with self._guard():
            content = self._content(tenant, file_id)
        if content is None:
            raise file_not_found(file_id)
        return content

    def list(self, tenant: str, *, limit: int = 20, after: str | None = None) -> list[FileRecord]:
        """The tenant's files, newest first; with `after` (the last id of the previous
        page) the ones older than it. `TrainingError` on `after` if it is no file of the
        tenant's."""
        check_key("tenant", tenant)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise TrainingError("limit", f"must be an integer in [1, {MAX_LIST_LIMIT}], got {limit!r}")
        cursor = None
        if after is not None:
            try:
                cursor = self.get(tenant, after)
            except UnknownFileError:
                raise TrainingError("after", f"no file {after!r} of yours to page after") from None
        with self._guard():
            return self._list(tenant, limit, cursor)

    def delete(self, tenant: str, file_id: str) -> None:
        """Delete the file (`UnknownFileError` if absent). Jobs made from it keep their
        own copy of its content."""
        check_key("tenant", tenant)
        validate_file_id(file_id)
        with self._guard():
            deleted = self._delete(tenant, file_id)
        if not deleted:
            raise file_not_found(file_id)

    def remove(self, tenant: str) -> int:
        """Delete every file of the tenant (a deleted tenant's); returns how many."""
        check_key("tenant", tenant)
        removed = 0
        while page := self.list(tenant, limit=MAX_LIST_LIMIT):
            for record in page:
                with self._guard():
                    removed += self._delete(tenant, record.id)
        return removed

    # -- what a backend implements (arguments already validated) --------------------------

    @abstractmethod
    def _put(self, record: FileRecord, content: bytes) -> None:
        """Atomically: check the tenant's quota (`files_quota_exceeded`), then store."""

    @abstractmethod
    def _get(self, tenant: str, file_id: str) -> FileRecord | None: ...

    @abstractmethod
    def _content(self, tenant: str, file_id: str) -> bytes | None: ...

    @abstractmethod
    def _list(self, tenant: str, limit: int, after: FileRecord | None) -> list[FileRecord]:
        """Newest first (ties by id), older than `after` when given."""

    @abstractmethod
    def _delete(self, tenant: str, file_id: str) -> bool:
        """True if the tenant had the file."""


def _check_filename(filename: object) -> str:
    """A name to show back, as uploaded: any text but control characters (it ends up in
    headers and terminals), at most MAX_FILENAME_CHARS."""
    if not isinstance(filename, str) or not filename.strip():
        raise TrainingError("file", "needs a filename (the multipart part's `filename`)")
    if len(filename) > MAX_FILENAME_CHARS:
        raise TrainingError("file", f"the filename's {len(filename)} characters exceed {MAX_FILENAME_CHARS}")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in filename):
        raise TrainingError("file", "the filename contains control characters")
    return filename
