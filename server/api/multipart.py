"""Reading a `multipart/form-data` upload with every part bounded: the files of the
fine-tuning job form and of `POST /v1/files`. Starlette's parser bounds the fields and
the number of parts but not a file's size; `_BoundedParser` refuses a file part as soon
as it streams past its limit, before it is read in full."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from server.training import DatasetTooLargeError

from .errors import APIError

MAX_FIELD_BYTES = 64 << 10  # one form field other than a file (the hyperparameters JSON is the largest)


@dataclass(frozen=True)
class UploadedFile:
    filename: str | None  # as the client named it (None for a field pasted as text)
    content: bytes


@dataclass(frozen=True)
class Form:
    files: dict[str, UploadedFile]
    fields: dict[str, list[str]]  # every value of each field, in order


async def read_form(request: Request, *, file_fields: tuple[str, ...], max_file_bytes: int, max_fields: int) -> Form:
    """The form's files (only the names in `file_fields`; a file part of another name is
    a 400 naming it) and its other fields. A file field sent as text (`curl -F
    'training_file=<data.jsonl'`) counts as the file."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise APIError("unsupported_media_type", "send multipart/form-data", "content-type")
    parser = _BoundedParser(
        request.headers,
        request.stream(),
        max_file_bytes=max_file_bytes,
        max_files=len(file_fields),
        max_fields=max_fields,
        max_part_size=MAX_FIELD_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise APIError("invalid_request", f"malformed multipart body: {exc.message}", "body") from None
    try:
        files: dict[str, UploadedFile] = {}
        fields: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in file_fields:
                    raise APIError("invalid_request", f"unexpected file {key!r}: send {' and '.join(file_fields)}", key)
                files[key] = UploadedFile(value.filename, await value.read())
            elif key in file_fields:
                files[key] = UploadedFile(None, value.encode())
            else:
                fields.setdefault(key, []).append(value)
    finally:
        await form.close()
    return Form(files, fields)


class _BoundedParser(MultiPartParser):
    """Starlette's multipart parser, refusing a file part as soon as it streams past
    `max_file_bytes` (starlette bounds only the non-file parts)."""

    def __init__(self, *args: Any, max_file_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_file_bytes = max_file_bytes
        self._part_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._part_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._part_bytes += end - start
        if self._current_part.file is not None and self._part_bytes > self.max_file_bytes:
            raise DatasetTooLargeError(
                self._current_part.field_name, f"more than the limit of {self.max_file_bytes} bytes"
            )
        super().on_part_data(data, start, end)
