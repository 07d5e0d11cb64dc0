"""Fine-tuning jobs: upload a dataset, follow the job, cancel it.

The upload is checked in full before anything is queued: the body's size (by the app's
body-limit middleware, from Content-Length or as it streams), each file's size while it
streams in, then hyperparameters against the base model and every row of both files
(`prepare_job`, the check a worker repeats), then the adapter it would publish against the
tenant's quotas (`check_quota`), so a bad upload is refused at once with the field at
fault and leaves no job behind. Every
queue call is scoped by the caller's tenant: another tenant's job is a 404. Queue and
training errors propagate and are mapped in `errors`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from adapter_store import AdapterError, AdapterNotFoundError, QuotaExceededError
from adapter_store.store import AdapterStore, StoreQuota, validate_key
from adapter_store.store.base import quota_exceeded
from adapter_store.untrusted_json import load_untrusted_json
from server.training import (
    DatasetError,
    DatasetTooLargeError,
    HyperparameterError,
    JobQueue,
    JobRecord,
    PreparedJob,
    TrainingError,
    TrainingHyperparameters,
    TrainingLimits,
    model_context,
    prepare_job,
    published_bytes,
)
from server.training.jobs.base import MAX_LIST_LIMIT

from .deps import CallerDep, Services, ServicesDep, TenantDep, still_current, tenant_deleted
from .errors import APIError, from_typed_error
from .generation import sse, sse_response
from .job_schemas import CreateJobForm, FineTuningJob, FineTuningJobEvent, JobEventList, JobList

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

FILE_FIELDS = ("training_file", "validation_file")
HYPERPARAMETER_FIELDS = frozenset(TrainingHyperparameters.model_fields)
MAX_FIELD_BYTES = 64 << 10  # one form field other than a file (the hyperparameters JSON is the largest)
MAX_PAGE = MAX_LIST_LIMIT - 1  # one more job is fetched to learn `has_more`
FOLLOW_POLL_S = 0.5  # how often a followed job is read again
KEEPALIVE_S = 15.0  # an SSE comment when nothing else was sent, so proxies keep the stream


def job_queue(services: ServicesDep) -> JobQueue:
    """The queue, or 503 when fine-tuning is off. Routes take it after `TenantDep` (FastAPI
    resolves dependencies in order), so a caller without a valid key gets a 401 first."""
    if services.jobs is None:
        raise APIError("unavailable", "fine-tuning is disabled on this server", "fine_tuning")
    return services.jobs


JobsDep = Annotated[JobQueue, Depends(job_queue)]


@router.post(
    "",
    status_code=201,
    response_model=FineTuningJob,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": CreateJobForm.openapi_schema()}},
        }
    },
)
async def create_job(
    request: Request, services: ServicesDep, caller: CallerDep, tenant: TenantDep, jobs: JobsDep
) -> FineTuningJob:
    """Queue a job that trains a VB-LoRA adapter on the uploaded JSONL file(s) and
    publishes it as the next version of `adapter`. Refused now (429 `quota_exceeded` on
    `adapter`) if that adapter would not fit the tenant's adapter or byte quota as things
    stand; the publish checks the quota again, atomically with the write."""
    upload = await read_upload(request, services.settings.training_max_file_bytes)
    if upload.adapter == services.model_name:
        raise APIError("conflict", f"{upload.adapter!r} is the base model's name", "adapter")
    prepared = await asyncio.to_thread(check_upload, services, upload)
    size = published_bytes(prepared.config, upload.hyperparameters.torch_save_dtype)
    await asyncio.to_thread(check_quota, services.store, tenant, caller.quota, upload.adapter, size)
    record = await asyncio.to_thread(
        jobs.submit, tenant, upload.adapter, upload.hyperparameters, upload.training_file, upload.validation_file
    )
    if not await asyncio.to_thread(still_current, services, caller):  # deleted while the upload streamed in
        await asyncio.to_thread(jobs.remove, tenant, record.id)
        raise tenant_deleted()
    return FineTuningJob.of(record)


@router.get("", response_model=JobList)
def list_jobs(
    tenant: TenantDep,
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    after: Annotated[
        str | None, Query(max_length=64, description="The last job id of the previous page: list older jobs")
    ] = None,
) -> JobList:
    """The newest jobs first (finished ones are kept for `VBSERVE_TRAINING_JOB_RETENTION_S`)."""
    records = jobs.list(tenant, limit=limit + 1, after=after)
    return JobList(data=[FineTuningJob.of(r) for r in records[:limit]], has_more=len(records) > limit)


@router.get("/{job_id}", response_model=FineTuningJob)
def get_job(job_id: str, tenant: TenantDep, jobs: JobsDep) -> FineTuningJob:
    return FineTuningJob.of(jobs.get(tenant, job_id))


@router.get(
    "/{job_id}/events",
    response_model=JobEventList,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    tenant: TenantDep,
    jobs: JobsDep,
    stream: Annotated[bool, Query(description="Follow the job as server-sent events until it ends")] = False,
    accept: Annotated[str | None, Header()] = None,
) -> JobEventList | StreamingResponse:
    """The job's progress reports (step, loss, validation loss, tokens/s), oldest first.
    Streamed (`?stream=true` or `Accept: text/event-stream`), each `data:` line is an event
    or, whenever the job's status changes, the job itself; `data: [DONE]` ends the stream
    once the job has ended."""
    if stream or "text/event-stream" in (accept or ""):
        first = await asyncio.to_thread(jobs.get, tenant, job_id)  # a 404 before the stream starts
        return sse_response(follow(jobs, tenant, first))
    events = await asyncio.to_thread(jobs.events, tenant, job_id)
    return JobEventList(data=[FineTuningJobEvent.of(e) for e in events])


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(job_id: str, tenant: TenantDep, jobs: JobsDep) -> FineTuningJob:
    """A queued job ends at once; a running one within a training step (its status stays
    `running` with `cancel_requested` until then). Nothing is published either way."""
    return FineTuningJob.of(jobs.cancel(tenant, job_id))


# -- the upload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobUpload:
    adapter: str
    hyperparameters: TrainingHyperparameters
    training_file: bytes
    validation_file: bytes | None


async def read_upload(request: Request, max_file_bytes: int) -> JobUpload:
    """The form's files and fields, refusing a file over its limit before it is read in
    full (starlette's parser bounds fields, not files: `_BoundedParser` does)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise APIError("unsupported_media_type", "send multipart/form-data", "content-type")
    parser = _BoundedParser(
        request.headers,
        request.stream(),
        max_file_bytes=max_file_bytes,
        max_files=len(FILE_FIELDS),
        max_fields=len(HYPERPARAMETER_FIELDS) + 2,
        max_part_size=MAX_FIELD_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise APIError("invalid_request", f"malformed multipart body: {exc.message}", "body") from None
    try:
        files: dict[str, bytes] = {}
        fields: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in FILE_FIELDS:
                    raise APIError("invalid_request", f"unexpected file {key!r}: send {' and '.join(FILE_FIELDS)}", key)
                files[key] = await value.read()
            elif key in FILE_FIELDS:
                files[key] = value.encode()  # pasted as text (`curl -F 'training_file=<data.jsonl'`)
            else:
                fields.setdefault(key, []).append(value)
    finally:
        await form.close()
    if "training_file" not in files:
        raise DatasetError("training_file", "is required: a JSONL file of training rows")
    return JobUpload(
        adapter=_adapter_name(fields.pop("adapter", [])),
        hyperparameters=_hyperparameters(fields),
        training_file=files["training_file"],
        validation_file=files.get("validation_file"),
    )


def check_upload(services: Services, upload: JobUpload) -> PreparedJob:
    """Refuse what the worker would refuse (hyperparameters that do not fit the model, any
    bad row), now rather than after the job waited in the queue. Tokenizes every row: call
    it in a worker thread."""
    runner = services.engine.runner
    return prepare_job(
        runner.base_module_shapes,
        services.tokenizer,
        upload.hyperparameters,
        upload.training_file,
        upload.validation_file,
        limits=TrainingLimits.from_settings(services.settings),
        max_positions=model_context(runner.model),
        base_model=services.model_name,
    )


def check_quota(store: AdapterStore, tenant: str, quota: StoreQuota, name: str, size: int) -> None:
    """`QuotaExceededError` on `adapter` if publishing `size` bytes as `name` would take
    the tenant over its quota today (a new name counts one adapter more, a new version its
    size difference), as `store.put` would decide."""
    count, stored = store.count(tenant)
    try:
        replaced = store.get_record(tenant, name).stored_bytes
    except AdapterNotFoundError:
        replaced = None
    over = None
    if replaced is None and quota.max_adapters is not None and count + 1 > quota.max_adapters:
        over = quota_exceeded("adapters", quota)
    elif quota.max_bytes is not None and stored - (replaced or 0) + size > quota.max_bytes:
        over = quota_exceeded("bytes", quota)
    if over is not None:
        raise QuotaExceededError("adapter", f"the job's adapter ({size} bytes) cannot be published: {over.reason}")


def _adapter_name(values: list[str]) -> str:
    if len(values) != 1:
        raise APIError("invalid_request", "give the adapter name to publish, once", "adapter")
    try:
        return validate_key("adapter", values[0])
    except AdapterError as exc:
        raise from_typed_error(exc) from None


def _hyperparameters(fields: dict[str, list[str]]) -> TrainingHyperparameters:
    """One JSON `hyperparameters` field and/or one form field per hyperparameter; a name
    given both ways is refused rather than one silently winning."""
    data: dict[str, Any] = {}
    if "hyperparameters" in fields:
        [text, *more] = fields.pop("hyperparameters")
        if more:
            raise HyperparameterError("hyperparameters", "given more than once")
        data = load_untrusted_json(text, "hyperparameters", error=HyperparameterError)
        if not isinstance(data, dict):
            raise HyperparameterError("hyperparameters", "must be a JSON object")
    for name, values in fields.items():
        if name in data:
            raise HyperparameterError(f"hyperparameters.{name}", "given both in the JSON field and as a form field")
        if name == "target_modules":  # repeated fields or one comma-separated list
            data[name] = [m.strip() for v in values for m in v.split(",") if m.strip()]
        elif len(values) > 1:
            raise HyperparameterError(f"hyperparameters.{name}", "given more than once")
        else:
            data[name] = values[0]
    return TrainingHyperparameters.parse(data)


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


# -- following a job -----------------------------------------------------------------------


async def follow(jobs: JobQueue, tenant: str, first: JobRecord) -> AsyncIterator[str]:
    """SSE lines: the job, then new events and status changes until it ends."""
    yield sse(FineTuningJob.of(first))
    status = _status(first)
    last_event: tuple[float, int] | None = None  # (time, step): a re-run restarts at step 1, later
    last_sent = time.monotonic()
    while True:
        try:
            # The record first: if it has ended, every event was written before this read.
            record = await asyncio.to_thread(jobs.get, tenant, first.id)
            events = await asyncio.to_thread(jobs.events, tenant, first.id)
        # The status line is long gone: an error travels as an event (the queue went
        # away, the job expired), then the stream ends.
        except (AdapterError, TrainingError) as exc:
            yield sse(from_typed_error(exc).body())
            return
        for event in events:
            if last_event is None or (event.time, event.step) > last_event:
                yield sse(FineTuningJobEvent.of(event))
                last_event, last_sent = (event.time, event.step), time.monotonic()
        if _status(record) != status:
            status = _status(record)
            yield sse(FineTuningJob.of(record))
            last_sent = time.monotonic()
        if record.state.terminal:
            yield sse("[DONE]")
            return
        if time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(FOLLOW_POLL_S)


def _status(record: JobRecord) -> tuple[str, int, bool]:
    """What, when it changes, a follower is sent the job for."""
    return record.state.value, record.attempts, record.cancel_requested
