"""The HTTP contract of uploaded files, in OpenAI's shape (`GET /v1/files` lists
`{"object": "file", "id": "file-...", "bytes", "created_at", "filename", "purpose",
"status"}` objects)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from vbserve.training.files import FileRecord


class UploadForm(BaseModel):
    """The `multipart/form-data` fields of `POST /v1/files` (read by hand, so the file is
    refused while it streams in; this model documents the form)."""

    file: bytes = Field(description='JSONL, one `{"prompt", "completion"}` or `{"messages": [...]}` object per line')
    purpose: Literal["fine-tune"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix seconds")
    filename: str
    purpose: str
    status: Literal["processed"] = Field("processed", description="Every row was checked at upload")

    @classmethod
    def of(cls, record: FileRecord) -> FileObject:
        return cls(
            id=record.id,
            bytes=record.bytes,
            created_at=int(record.created),
            filename=record.filename,
            purpose=record.purpose,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject] = Field(description="Newest first")
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: Literal[True] = True
