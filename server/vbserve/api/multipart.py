"""Reading a `multipart/form-data` upload with every part bounded: the files of the
fine-tuning job form and of `POST /v1/files`. `python-multipart`'s streaming parser calls
back with each part's headers and data as the body streams in, so a file part is refused
as soon as it passes its limit, before it is read in full (Starlette's form parser bounds
the fields and the number of parts but not a file's size)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from vbserve.training import DatasetTooLargeError

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
    'training_file=<data.jsonl'`) counts as the file. At most one file per name in
    `file_fields` and `max_fields` other fields; only whole parts count (a body cut short
    loses its last part)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type.strip().lower() != b"multipart/form-data":
        raise APIError("unsupported_media_type", "send multipart/form-data", "content-type")
    if b"boundary" not in options:
        raise _malformed("no boundary in the content-type")
    reader = _FormReader(file_fields, max_file_bytes, max_fields)
    parser = MultipartParser(options[b"boundary"], reader.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise _malformed("not valid multipart data") from None
    return reader.form()


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None  # set: a file part
    data: bytearray = field(default_factory=bytearray)


class _FormReader:
    """The parser's callbacks: collect each part, counting and bounding parts as they come."""

    def __init__(self, file_fields: tuple[str, ...], max_file_bytes: int, max_fields: int) -> None:
        self.file_fields = file_fields
        self.max_file_bytes = max_file_bytes
        self.max_fields = max_fields
        self.part = _Part()
        self.header = (bytearray(), bytearray())  # the header being read: name, value
        self.files: dict[str, UploadedFile] = {}
        self.fields: dict[str, list[str]] = {}
        self.file_parts = self.field_parts = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda data, start, end: self.header[0].extend(data[start:end]),
            "on_header_value": lambda data, start, end: self.header[1].extend(data[start:end]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_end(self) -> None:
        name, value = self.header
        self.part.headers[bytes(name).lower()] = bytes(value)
        self.header = (bytearray(), bytearray())

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition"))
        if b"name" not in options:
            raise _malformed('a part\'s Content-Disposition has no "name"')
        self.part.name = _text(options[b"name"], "body")
        if b"filename" in options:
            self.part.filename = _text(options[b"filename"], self.part.name)
            if self.part.name not in self.file_fields:
                raise APIError(
                    "invalid_request",
                    f"unexpected file {self.part.name!r}: send {' and '.join(self.file_fields)}",
                    self.part.name,
                )
            self.file_parts += 1
            if self.file_parts > len(self.file_fields):
                raise _malformed(f"more than {len(self.file_fields)} files")
        else:
            self.field_parts += 1
            if self.field_parts > self.max_fields:
                raise _malformed(f"more than {self.max_fields} fields")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        part.data += data[start:end]
        if part.filename is not None and len(part.data) > self.max_file_bytes:
            raise DatasetTooLargeError(part.name, f"more than the limit of {self.max_file_bytes} bytes")
        if part.filename is None and len(part.data) > MAX_FIELD_BYTES:
            raise _malformed(f"the field {part.name!r} is over {MAX_FIELD_BYTES // 1024} KiB")

    def on_part_end(self) -> None:
        part = self.part
        if part.filename is not None:
            self.files[part.name] = UploadedFile(part.filename, bytes(part.data))
        elif part.name in self.file_fields:
            self.files[part.name] = UploadedFile(None, bytes(part.data))
        else:
            self.fields.setdefault(part.name, []).append(_text(part.data, part.name))

    def form(self) -> Form:
        return Form(self.files, self.fields)


def _text(data: bytes | bytearray, field_name: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise APIError("invalid_request", "is not valid UTF-8", field_name) from None


def _malformed(reason: str) -> APIError:
    return APIError("invalid_request", f"malformed multipart body: {reason}", "body")
