"""Fine-tuning jobs: upload a dataset (or name files uploaded with `POST /v1/files`, as
OpenAI's API does), follow the job, cancel it.

The upload is checked in full before anything is queued: the body's size (by the
route's body limit, from Content-Length or as it streams), each file's size while it
streams in, then hyperparameters against the base model and every row of both files
(`prepare_job`, the check a worker repeats), then the adapter it would publish against the
tenant's quotas (`check_quota`), so a bad upload is refused at once with the field at
fault and leaves no job behind. Every
queue call is scoped by the caller's tenant: another tenant's job is a 404. Queue and
training errors propagate and are mapped in `errors`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from vbserve.backends import validate_key
from vbserve.training import (
    DatasetError,
    HyperparameterError,
    JobQueue,
    JobRecord,
    JobState,
    PreparedJob,
    TrainingError,
    TrainingHyperparameters,
    TrainingLimits,
    prepare_job,
    published_bytes,
)
from vbserve.training.errors import UnknownFileError
from vbserve.training.files import FileStore
from vbserve.training.hyperparams import from_openai, request_field
from vbserve.training.jobs.base import MAX_LIST_LIMIT
from vbserve.training.prepare import fit_to_bank, load_frozen_bank, prepare_fit, with_fit_defaults
from vbserve_store import (
    AdapterConfig,
    AdapterError,
    AdapterNotFoundError,
    AdapterValidationError,
    BankNotFoundError,
    QuotaExceededError,
    decode_lora,
)
from vbserve_store.store import AdapterStore, StoreQuota
from vbserve_store.store.base import quota_exceeded
from vbserve_store.untrusted_json import load_untrusted_json

from ..body_limits import BodyLimitedRoute, body_limit, read_body, training_upload_limit
from ..deps import CallerDep, Services, ServicesDep, TenantDep, still_current, tenant_deleted
from ..errors import APIError, field_of, from_typed_error
from ..generation import sse, sse_response
from ..multipart import read_form
from ..schemas.jobs import (
    CheckpointList,
    CreateJobForm,
    CreateJobRequest,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobEventList,
    JobList,
    OpenAIHyperparameters,
)

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], route_class=BodyLimitedRoute)

FILE_FIELDS = ("training_file", "validation_file")
HYPERPARAMETER_FIELDS = frozenset(TrainingHyperparameters.model_fields)
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
            "content": {
                "multipart/form-data": {"schema": CreateJobForm.openapi_schema()},
                "application/json": {"schema": CreateJobRequest.model_json_schema()},
            },
        }
    },
)
@body_limit(training_upload_limit)
async def create_job(
    request: Request, services: ServicesDep, caller: CallerDep, tenant: TenantDep, jobs: JobsDep
) -> FineTuningJob:
    """Queue a job that trains a VB-LoRA adapter and publishes it. Two bodies:
    `multipart/form-data` with the JSONL files themselves, publishing the next version of
    `adapter`; or `application/json` as OpenAI's API has it (`CreateJobRequest`: file ids
    from `POST /v1/files`), publishing a new adapter `ft-<suffix>-<8 hex digits>`. Refused
    now (429 `quota_exceeded` on `adapter`) if that adapter would not fit the tenant's
    adapter or byte quota as things stand; the publish checks the quota again, atomically
    with the write."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json":
        upload = await read_openai_request(request, services, tenant)
    else:
        upload = await read_upload(request, services.settings.training_max_file_bytes)
    if upload.adapter == services.model_name:
        raise APIError("conflict", f"{upload.adapter!r} is the base model's name", "adapter")
    try:
        hp, bank = await asyncio.to_thread(with_frozen_bank, services.store, tenant, upload.hyperparameters)
        if hp.method == "fit_lora":
            hp, source_blob = await asyncio.to_thread(with_fit_source, services, tenant, hp, bank)
            upload = dataclasses.replace(upload, hyperparameters=hp, training_file=source_blob)
            config, trained_tokens = check_fit(services, hp, source_blob, bank), None
        else:
            upload = dataclasses.replace(upload, hyperparameters=hp)
            prepared = await services.dataset_checks.run(
                lambda tokenizer: check_upload(services, upload, tokenizer, bank)
            )
            config, trained_tokens = prepared.config, prepared.trained_tokens(hp)
    except (HyperparameterError, AdapterNotFoundError) as exc:  # named by the trainer's field; name the request's
        if upload.request_fields is None:
            raise
        raise type(exc)(request_field(exc.field, upload.request_fields), exc.reason) from None
    size = published_bytes(config, hp.torch_save_dtype)
    await asyncio.to_thread(check_quota, services.store, tenant, caller.quota, upload.adapter, size)
    record = await asyncio.to_thread(
        functools.partial(
            jobs.submit,
            tenant,
            upload.adapter,
            hp,
            upload.training_file,
            upload.validation_file,
            training_file_id=upload.training_file_id,
            validation_file_id=upload.validation_file_id,
            trained_tokens=trained_tokens,
        )
    )
    if not await asyncio.to_thread(still_current, services, caller):  # deleted while the upload streamed in
        await asyncio.to_thread(jobs.remove, tenant, record.id)
        raise tenant_deleted()
    return FineTuningJob.of(record, services.model_name)


@router.get("", response_model=JobList)
def list_jobs(
    services: ServicesDep,
    tenant: TenantDep,
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    after: Annotated[
        str | None, Query(max_length=64, description="The last job id of the previous page: list older jobs")
    ] = None,
) -> JobList:
    """The newest jobs first (finished ones are kept for `VBSERVE_TRAINING_JOB_RETENTION_S`)."""
    records = jobs.list(tenant, limit=limit + 1, after=after)
    return JobList(
        data=[FineTuningJob.of(r, services.model_name) for r in records[:limit]], has_more=len(records) > limit
    )


@router.get("/{job_id}", response_model=FineTuningJob)
def get_job(job_id: str, services: ServicesDep, tenant: TenantDep, jobs: JobsDep) -> FineTuningJob:
    return FineTuningJob.of(jobs.get(tenant, job_id), services.model_name)


@router.get(
    "/{job_id}/events",
    response_model=JobEventList,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    services: ServicesDep,
    tenant: TenantDep,
    jobs: JobsDep,
    stream: Annotated[bool, Query(description="Follow the job as server-sent events until it ends")] = False,
    accept: Annotated[str | None, Header()] = None,
) -> JobEventList | EventSourceResponse:
    """The job's progress reports (step, loss, validation loss, tokens/s), oldest first.
    Streamed (`?stream=true` or `Accept: text/event-stream`), each `data:` line is an event
    or, whenever the job's status changes, the job itself; `data: [DONE]` ends the stream
    once the job has ended."""
    if stream or "text/event-stream" in (accept or ""):
        first = await asyncio.to_thread(jobs.get, tenant, job_id)  # a 404 before the stream starts
        return sse_response(follow(jobs, tenant, first, services.model_name))
    record = await asyncio.to_thread(jobs.get, tenant, job_id)
    events = await asyncio.to_thread(jobs.events, tenant, job_id)
    return JobEventList(data=[FineTuningJobEvent.of(job_id, e, _method(record)) for e in events])


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def job_checkpoints(job_id: str, tenant: TenantDep, jobs: JobsDep) -> CheckpointList:
    """The adapter a succeeded job published, as its one checkpoint (the best by validation
    loss when it had validation rows); none before."""
    record = jobs.get(tenant, job_id)
    data = (
        [FineTuningJobCheckpoint.of(record, jobs.events(tenant, job_id))] if record.state is JobState.SUCCEEDED else []
    )
    return CheckpointList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(job_id: str, services: ServicesDep, tenant: TenantDep, jobs: JobsDep) -> FineTuningJob:
    """A queued job ends at once; a running one within a training step (its status stays
    `running` with `cancel_requested` until then). Nothing is published either way."""
    return FineTuningJob.of(jobs.cancel(tenant, job_id), services.model_name)


# -- the upload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobUpload:
    adapter: str
    hyperparameters: TrainingHyperparameters
    training_file: bytes
    validation_file: bytes | None
    training_file_id: str | None = None  # an OpenAI request's file ids
    validation_file_id: str | None = None
    # An OpenAI request's field behind each trainer hyperparameter (`from_openai`); None
    # for the form, whose fields are the trainer's own.
    request_fields: dict[str, str] | None = None


async def read_upload(request: Request, max_file_bytes: int) -> JobUpload:
    """The form's files and fields, each file refused as soon as it streams past its limit."""
    form = await read_form(
        request, file_fields=FILE_FIELDS, max_file_bytes=max_file_bytes, max_fields=len(HYPERPARAMETER_FIELDS) + 2
    )
    adapter = _adapter_name(form.fields.pop("adapter", []))
    hp = _hyperparameters(form.fields)
    if hp.method == "fit_lora":
        for name in form.files:
            raise DatasetError(name, "a fit_lora job reads no files: it converts hyperparameters.source_adapter")
        # The source adapter's blob takes the training file's place (`with_fit_source`).
        return JobUpload(adapter=adapter, hyperparameters=hp, training_file=b"", validation_file=None)
    if "training_file" not in form.files:
        raise DatasetError("training_file", "is required: a JSONL file of training rows")
    validation = form.files.get("validation_file")
    return JobUpload(
        adapter=adapter,
        hyperparameters=hp,
        training_file=form.files["training_file"].content,
        validation_file=None if validation is None else validation.content,
    )


async def read_openai_request(request: Request, services: Services, tenant: str) -> JobUpload:
    """An OpenAI job request: its fields checked (each refusal a 400 naming the field),
    its files read from the tenant's uploads."""
    body = load_untrusted_json(
        await read_body(request, services.settings.max_request_bytes), "body", error=TrainingError
    )
    try:
        job = CreateJobRequest.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        field = field_of([{**e, "loc": ("body", *e["loc"])} for e in errors])
        raise APIError("invalid_request", f"{field}: {errors[0]['msg']}", field) from None
    if job.model != services.model_name:
        raise APIError("invalid_request", f"the base model is {services.model_name!r}, not {job.model!r}", "model")
    if job.integrations:
        raise APIError("invalid_request", "no integrations are supported here", "integrations")
    hp, request_fields = _trainer_hyperparameters(job)
    if hp.method == "fit_lora":
        raise APIError(
            "invalid_request",
            "a fit_lora job reads no training file: create it with the multipart form",
            "vblora.method",
        )
    try:
        suffix = "" if job.suffix is None else validate_key("suffix", job.suffix) + "-"
    except AdapterError as exc:
        raise from_typed_error(exc) from None
    if services.files is None:
        raise APIError("unavailable", "uploaded files are not available on this server", "training_file")
    training = await asyncio.to_thread(_uploaded, services.files, tenant, job.training_file, "training_file")
    validation = None
    if job.validation_file is not None:
        validation = await asyncio.to_thread(_uploaded, services.files, tenant, job.validation_file, "validation_file")
    return JobUpload(
        adapter=f"ft-{suffix}{uuid.uuid4().hex[:8]}",
        hyperparameters=hp,
        training_file=training,
        validation_file=validation,
        training_file_id=job.training_file,
        validation_file_id=job.validation_file,
        request_fields=request_fields,
    )


def _trainer_hyperparameters(job: CreateJobRequest) -> tuple[TrainingHyperparameters, dict[str, str]]:
    """The trainer's hyperparameters from OpenAI's (top-level or under `method`) and
    `vblora`, with the request field behind each (see `from_openai`)."""
    hyperparameters, where = job.hyperparameters, "hyperparameters"
    if job.method is not None:
        if job.method.type != "supervised":
            raise APIError(
                "invalid_request", f"only 'supervised' fine-tuning runs here, not {job.method.type!r}", "method.type"
            )
        for other in ("dpo", "reinforcement"):
            if getattr(job.method, other) is not None:
                raise APIError(
                    "invalid_request", "only method.supervised applies to supervised jobs", f"method.{other}"
                )
        if job.method.supervised is not None:
            if hyperparameters is not None:
                raise APIError("invalid_request", "give them here or in method.supervised, not both", where)
            hyperparameters, where = job.method.supervised.hyperparameters, "method.supervised.hyperparameters"
    hyperparameters = hyperparameters or OpenAIHyperparameters()
    return from_openai(
        **{name: hyperparameters.value(name) for name in OpenAIHyperparameters.model_fields},
        seed=job.seed,
        vblora=job.vblora,
        where={"seed": "seed", **{name: f"{where}.{name}" for name in OpenAIHyperparameters.model_fields}},
    )


def _uploaded(files: FileStore, tenant: str, file_id: str, field: str) -> bytes:
    try:
        return files.content(tenant, file_id)
    except UnknownFileError:
        raise APIError("invalid_request", f"no uploaded file {file_id!r} of yours (POST /v1/files)", field) from None


def with_frozen_bank(
    store: AdapterStore, tenant: str, hp: TrainingHyperparameters
) -> tuple[TrainingHyperparameters, torch.Tensor | None]:
    """A shared-bank job's hyperparameters as queued, and its bank (None for a job with a
    bank of its own). `bank_of` becomes that adapter's bank id now, so the family is pinned
    when the job is created (publishing the adapter again later does not move it); the
    bank's shape becomes `num_vectors` and `vector_length` where the job left them unset.
    A tenant may train only against a bank one of its own adapters uses: any other id is
    a 404, as for a bank that does not exist."""
    if hp.bank_of is not None:
        try:
            bank_id = store.get_record(tenant, hp.bank_of).bank_id
        except AdapterNotFoundError:
            raise AdapterNotFoundError("hyperparameters.bank_of", f"you have no adapter {hp.bank_of!r}") from None
        if not bank_id:
            raise AdapterValidationError(
                "hyperparameters.bank_of", f"{hp.bank_of!r} is a plain LoRA adapter: it has no bank"
            )
    elif hp.bank_id is not None:
        if not store.tenant_uses_bank(tenant, hp.bank_id):
            raise BankNotFoundError("hyperparameters.bank_id", "none of your adapters uses this bank")
        bank_id = hp.bank_id
    else:
        return hp, None
    bank = load_frozen_bank(store, bank_id)
    data = {**hp.model_dump(exclude_unset=True), "bank_id": bank_id}
    data.pop("bank_of", None)
    return fit_to_bank(TrainingHyperparameters.parse(data), bank), bank


def with_fit_source(
    services: Services, tenant: str, hp: TrainingHyperparameters, frozen_bank: torch.Tensor | None
) -> tuple[TrainingHyperparameters, bytes]:
    """A fit_lora job's hyperparameters as queued (`with_fit_defaults`) and the blob of its
    source adapter as it is now: the job keeps that copy (as a training job keeps its
    files), so the source may change or go while it waits. The source must be a plain LoRA
    adapter of the tenant's: another tenant's is a 404, as one that does not exist."""
    name = hp.source_adapter
    assert name is not None  # method fit_lora requires it
    field = "hyperparameters.source_adapter"
    try:
        record, blob = services.store.get_blob(tenant, name)
    except AdapterNotFoundError:
        raise AdapterNotFoundError(field, f"you have no adapter {name!r}") from None
    if record.bank_id:
        raise AdapterValidationError(field, f"{name!r} is a VB-LoRA adapter; fit_lora converts plain LoRA adapters")
    limit = services.settings.training_max_file_bytes
    if len(blob) > limit:
        raise APIError("too_large", f"{name!r} takes {len(blob)} bytes; a job may copy at most {limit}", field)
    source = decode_lora(blob, max_bytes=len(blob))
    return with_fit_defaults(hp, source, services.base_model), blob


def check_fit(
    services: Services, hp: TrainingHyperparameters, source_blob: bytes, frozen_bank: torch.Tensor | None
) -> AdapterConfig:
    """Refuse what the worker would refuse of a fit_lora job (`prepare_fit`), now."""
    return prepare_fit(
        services.base_model,
        hp,
        decode_lora(source_blob, max_bytes=len(source_blob)),
        limits=TrainingLimits.from_settings(services.settings),
        frozen_bank=frozen_bank,
    )


def check_upload(
    services: Services, upload: JobUpload, tokenizer: PreTrainedTokenizerBase, frozen_bank: torch.Tensor | None
) -> PreparedJob:
    """Refuse what the worker would refuse (hyperparameters that do not fit the model or
    the frozen bank, any bad row), now rather than after the job waited in the queue.
    Tokenizes every row with `tokenizer`: call it in `services.dataset_checks`."""
    return prepare_job(
        services.base_model,
        tokenizer,
        upload.hyperparameters,
        upload.training_file,
        upload.validation_file,
        limits=TrainingLimits.from_settings(services.settings),
        frozen_bank=frozen_bank,
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


# -- following a job -----------------------------------------------------------------------


async def follow(jobs: JobQueue, tenant: str, first: JobRecord, model: str) -> AsyncIterator[bytes]:
    """SSE lines: the job, then new events and status changes until it ends. `model`: the
    served base model's name."""
    yield sse(FineTuningJob.of(first, model))
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
                yield sse(FineTuningJobEvent.of(first.id, event, _method(first)))
                last_event, last_sent = (event.time, event.step), time.monotonic()
        if _status(record) != status:
            status = _status(record)
            yield sse(FineTuningJob.of(record, model))
            last_sent = time.monotonic()
        if record.state.terminal:
            yield sse("[DONE]")
            return
        if time.monotonic() - last_sent > KEEPALIVE_S:
            yield format_sse_event(comment="keep-alive")
            last_sent = time.monotonic()
        await asyncio.sleep(FOLLOW_POLL_S)


def _method(record: JobRecord) -> str:
    return record.hyperparameters.get("method", "supervised")


def _status(record: JobRecord) -> tuple[str, int, bool]:
    """What, when it changes, a follower is sent the job for."""
    return record.state.value, record.attempts, record.cancel_requested
