"""Files for fine-tuning, as OpenAI's files API has them: upload a JSONL dataset once,
then name it by id in jobs (`training_file`, `validation_file` of `POST
/v1/fine_tuning/jobs`).

An upload is checked in full before anything is stored: the body's size (the
route's body limit), the file's size as it streams, then every row as a job reads it
(`parse_jsonl`, the job route's own check), then the tenant's file quota, atomically with
the write. Row lengths are checked when a job names the file, against that job's
`max_seq_len`. Every call is scoped by the caller's tenant: another tenant's file is a 404.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from transformers import PreTrainedTokenizerBase

from vbserve.settings import Settings
from vbserve.training import TrainingLimits, parse_jsonl
from vbserve.training.files import FileStore
from vbserve.training.files.base import MAX_LIST_LIMIT
from vbserve.training.hyperparams import MAX_SEQ_LEN

from ..body_limits import BodyLimitedRoute, body_limit, file_upload_limit
from ..deps import CallerDep, ServicesDep, TenantDep, still_current, tenant_deleted
from ..errors import APIError
from ..multipart import read_form
from ..schemas.files import FileDeleted, FileList, FileObject, UploadForm

router = APIRouter(prefix="/v1/files", tags=["files"], route_class=BodyLimitedRoute)


def file_store(services: ServicesDep) -> FileStore:
    """The store, or 503 when fine-tuning is off (taken after `TenantDep`: a 401 first)."""
    if services.files is None:
        raise APIError("unavailable", "fine-tuning (and its files) is disabled on this server", "fine_tuning")
    return services.files


FilesDep = Annotated[FileStore, Depends(file_store)]


@router.post(
    "",
    response_model=FileObject,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": UploadForm.model_json_schema()}},
        }
    },
)
@body_limit(file_upload_limit)
async def upload_file(
    request: Request, services: ServicesDep, caller: CallerDep, tenant: TenantDep, files: FilesDep
) -> FileObject:
    form = await read_form(
        request, file_fields=("file",), max_file_bytes=services.settings.training_max_file_bytes, max_fields=2
    )
    purposes = form.fields.pop("purpose", [])
    if len(purposes) != 1:
        raise APIError("invalid_request", "give the file's purpose, once: fine-tune", "purpose")
    if form.fields:
        name = next(iter(form.fields))
        raise APIError("invalid_request", f"unknown field {name!r}: send file and purpose", name)
    upload = form.files.get("file")
    if upload is None:
        raise APIError("invalid_request", "is required: a JSONL file of training rows", "file")
    await services.dataset_checks.run(lambda tokenizer: check_rows(upload.content, tokenizer, services.settings))
    record = await asyncio.to_thread(files.put, tenant, upload.filename or "", purposes[0], upload.content)
    if not await asyncio.to_thread(still_current, services, caller):  # deleted while the upload streamed in
        await asyncio.to_thread(files.delete, tenant, record.id)
        raise tenant_deleted()
    return FileObject.of(record)


@router.get("", response_model=FileList)
def list_files(
    tenant: TenantDep,
    files: FilesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT - 1)] = 20,
    after: Annotated[str | None, Query(max_length=64, description="The last file id of the previous page")] = None,
    purpose: Annotated[str | None, Query(max_length=64, description="Only files of this purpose")] = None,
) -> FileList:
    """The newest files first."""
    records = [] if purpose not in (None, "fine-tune") else files.list(tenant, limit=limit + 1, after=after)
    page = [FileObject.of(r) for r in records[:limit]]
    return FileList(
        data=page,
        has_more=len(records) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: str, tenant: TenantDep, files: FilesDep) -> FileObject:
    return FileObject.of(files.get(tenant, file_id))


@router.get("/{file_id}/content", response_class=Response, responses={200: {"content": {"application/jsonl": {}}}})
def file_content(file_id: str, tenant: TenantDep, files: FilesDep) -> Response:
    return Response(files.content(tenant, file_id), media_type="application/jsonl")


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, tenant: TenantDep, files: FilesDep) -> FileDeleted:
    """Jobs already made from the file keep their own copy of it."""
    files.delete(tenant, file_id)
    return FileDeleted(id=file_id)


def check_rows(content: bytes, tokenizer: PreTrainedTokenizerBase, settings: Settings) -> None:
    """Refuse a file no job could train on (not UTF-8 JSONL, a row of the wrong shape, a
    role the chat template refuses), naming its line (`file line 7.messages[2].role`).
    Truncating instead of refusing long rows: their length is the job's to judge.
    Tokenizes every row: call it in `services.dataset_checks`, as the job route does."""
    parse_jsonl(
        content,
        tokenizer,
        max_seq_len=MAX_SEQ_LEN,
        truncation="truncate",
        limits=TrainingLimits.from_settings(settings).dataset,
        field="file",
    )
