"""The HTTP contract of fine-tuning jobs: the upload form and the response bodies.

Shapes follow OpenAI's fine-tuning API where it has one (`object`, `status`,
`created_at`, `finished_at`, `fine_tuned_model`, `hyperparameters`, `error`, lists with
`has_more`), plus what a VB-LoRA job has beyond it: the adapter it publishes and its
version, live progress, and per-step metrics as events.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from server.training import JobEvent, JobRecord, TrainingHyperparameters

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class CreateJobForm(BaseModel):
    """The `multipart/form-data` fields of `POST /v1/fine_tuning/jobs` (read by hand, so
    files are refused while they stream in; this model documents the form). Every
    hyperparameter may also be sent as a form field of its own (`r=8`, `max_steps=200`,
    `target_modules=q_proj,v_proj`), instead of or beside the JSON field."""

    training_file: bytes = Field(
        description='JSONL, one `{"prompt", "completion"}` or `{"messages": [...]}` object per line'
    )
    validation_file: bytes | None = Field(None, description="JSONL like training_file; its loss is reported per epoch")
    adapter: str = Field(description="Name the trained adapter is published under (as a new version)")
    hyperparameters: str | None = Field(None, description="A JSON object of hyperparameters (see the form fields)")

    @classmethod
    def openapi_schema(cls) -> dict[str, Any]:
        """This form's JSON schema with each hyperparameter listed as a field of its own."""
        schema = cls.model_json_schema()
        schema["properties"].update(TrainingHyperparameters.model_json_schema()["properties"])
        return schema


class JobProgress(BaseModel):
    step: int = Field(description="Optimizer steps done (0 until a worker starts)")
    total_steps: int = Field(description="Steps the job will run (0 until a worker starts)")
    loss: float | None = Field(description="Training loss at the last reported step")
    val_loss: float | None = Field(description="The last validation loss measured")
    tokens_per_s: float | None


class JobError(BaseModel):
    message: str = Field(description="`field: reason` for bad input, or what went wrong")


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    status: JobStatus
    created_at: int = Field(description="Unix seconds")
    finished_at: int | None = Field(description="Unix seconds; null until the job ends")
    adapter: str = Field(description="The adapter the job publishes")
    fine_tuned_model: str | None = Field(
        description="The adapter name once the job succeeded (pass it as `model`), else null"
    )
    adapter_version: int | None = Field(description="The adapter version the job published")
    hyperparameters: dict[str, Any]
    progress: JobProgress
    error: JobError | None
    attempts: int = Field(description="Workers that took the job (more than one after a worker died)")
    cancel_requested: bool

    @classmethod
    def of(cls, record: JobRecord) -> FineTuningJob:
        return cls(
            id=record.id,
            status=record.state.value,
            created_at=int(record.created),
            finished_at=int(record.updated) if record.state.terminal else None,
            adapter=record.adapter_name,
            fine_tuned_model=record.adapter_name if record.adapter_version is not None else None,
            adapter_version=record.adapter_version,
            hyperparameters=record.hyperparameters,
            progress=JobProgress(
                step=record.step,
                total_steps=record.total_steps,
                loss=record.loss,
                val_loss=record.val_loss,
                tokens_per_s=record.tokens_per_s,
            ),
            error=JobError(message=record.error) if record.error and record.state.terminal else None,
            attempts=record.attempts,
            cancel_requested=record.cancel_requested,
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob] = Field(description="Newest first")
    has_more: bool = Field(description="Older jobs exist beyond this page")


class FineTuningJobEvent(BaseModel):
    """One progress report of a running job."""

    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: float = Field(description="Unix seconds")
    step: int
    total_steps: int
    loss: float
    val_loss: float | None = Field(description="Set on the steps that ran validation")
    tokens_per_s: float

    @classmethod
    def of(cls, event: JobEvent) -> FineTuningJobEvent:
        return cls(
            created_at=event.time,
            step=event.step,
            total_steps=event.total_steps,
            loss=event.loss,
            val_loss=event.val_loss,
            tokens_per_s=event.tokens_per_s,
        )


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent] = Field(description="Oldest first; the newest events are kept")
