"""The HTTP contract of fine-tuning jobs: the upload form, OpenAI's JSON request, and
the response bodies.

Shapes follow OpenAI's fine-tuning API (the job, its events and checkpoints as the
official `openai` package reads them), plus what a VB-LoRA job has beyond it: the adapter
it publishes and its version, live progress, the trainer's own hyperparameters, and
per-step metrics on each event.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vbserve.training import JobEvent, JobRecord, JobState, TrainingHyperparameters
from vbserve.training.hyperparams import openai_view

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


class OpenAIHyperparameters(BaseModel):
    """OpenAI's hyperparameters; "auto" (or absent) keeps the trainer's default. How each
    maps to the VB-LoRA trainer: `vbserve.training.hyperparams.from_openai`."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"

    def value(self, name: str) -> int | float | None:
        """The value, None for "auto"."""
        value = getattr(self, name)
        return None if value == "auto" else value


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: OpenAIHyperparameters = Field(default_factory=OpenAIHyperparameters)


class Method(BaseModel):
    """Only "supervised" trains here; "dpo" and "reinforcement" are refused (400 naming
    `method.type`), their settings with them."""

    model_config = ConfigDict(extra="forbid")

    type: str
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class CreateJobRequest(BaseModel):
    """The `application/json` body of `POST /v1/fine_tuning/jobs`, as `openai`'s
    `client.fine_tuning.jobs.create(...)` sends it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The served base model's name (`GET /v1/models`)")
    training_file: str = Field(description="The id of a file uploaded with `POST /v1/files`")
    validation_file: str | None = Field(None, description="Another file id; its loss is reported per epoch")
    suffix: str | None = Field(
        None, max_length=64, description="Part of the adapter's name: `ft-<suffix>-<8 hex digits>`"
    )
    seed: int | None = None
    hyperparameters: OpenAIHyperparameters | None = Field(None, description="Deprecated by OpenAI for `method`")
    method: Method | None = None
    vblora: dict[str, Any] = Field(
        default_factory=dict,
        description="The VB-LoRA trainer's own hyperparameters by name (r, num_vectors, target_modules, "
        "max_steps, ...); with the openai package, pass them as `extra_body={'vblora': {...}}`",
    )
    metadata: dict[str, str] | None = Field(None, description="Accepted and not kept")
    integrations: list[Any] | None = Field(None, description="None are supported: must be empty")


class JobError(BaseModel):
    code: Literal["training_failed"] = "training_failed"
    message: str = Field(description="`field: reason` for bad input, or what went wrong")
    param: str | None = Field(None, description="Always null: the message names the field")


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    status: JobStatus
    model: str = Field(description="The base model the adapter is trained on")
    organization_id: str = Field(description="The tenant")
    created_at: int = Field(description="Unix seconds")
    finished_at: int | None = Field(description="Unix seconds; null until the job ends")
    adapter: str = Field(description="The adapter the job publishes")
    fine_tuned_model: str | None = Field(
        description="The adapter name once the job succeeded (pass it as `model`), else null"
    )
    adapter_version: int | None = Field(description="The adapter version the job published")
    training_file: str | None = Field(description="The file id it was made from; null for a multipart upload")
    validation_file: str | None
    trained_tokens: int | None = Field(description="Once succeeded: its rows' tokens times its epochs")
    seed: int
    hyperparameters: dict[str, Any] = Field(
        description="OpenAI's n_epochs, batch_size and learning_rate_multiplier (lr_bank / 1e-2), "
        "and every hyperparameter of the VB-LoRA trainer by its own name"
    )
    method: dict[str, Any]
    result_files: list[str] = Field(default_factory=list, description="Always empty: the result is the adapter")
    integrations: list[Any] = Field(default_factory=list)
    estimated_finish: int | None = None
    progress: JobProgress
    error: JobError | None
    attempts: int = Field(description="Workers that took the job (more than one after a worker died)")
    cancel_requested: bool

    @classmethod
    def of(cls, record: JobRecord, model: str) -> FineTuningJob:
        """`model`: the served base model's name."""
        openai = openai_view(record.hyperparameters)
        succeeded = record.state is JobState.SUCCEEDED
        return cls(
            id=record.id,
            status=record.state.value,
            model=model,
            organization_id=record.tenant,
            created_at=int(record.created),
            finished_at=int(record.updated) if record.state.terminal else None,
            adapter=record.adapter_name,
            fine_tuned_model=record.adapter_name if record.adapter_version is not None else None,
            adapter_version=record.adapter_version,
            training_file=record.training_file_id,
            validation_file=record.validation_file_id,
            trained_tokens=record.trained_tokens if succeeded else None,
            seed=record.hyperparameters.get("seed", 0),
            hyperparameters={**record.hyperparameters, **openai},
            method=_method(record.hyperparameters, openai),
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


def _method(hyperparameters: dict[str, Any], openai: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `method` of a job: supervised, or ours, fit_lora, with its source adapter."""
    if hyperparameters.get("method") == "fit_lora":
        return {"type": "fit_lora", "fit_lora": {"source_adapter": hyperparameters.get("source_adapter")}}
    return {"type": "supervised", "supervised": {"hyperparameters": openai}}


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob] = Field(description="Newest first")
    has_more: bool = Field(description="Older jobs exist beyond this page")


class FineTuningJobEvent(BaseModel):
    """One progress report of a running job: OpenAI's event (`level`, `message`, `type`
    "metrics", `data`) with the metrics also as fields of their own."""

    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: float = Field(description="Unix seconds")
    level: Literal["info"] = "info"
    type: Literal["metrics"] = "metrics"
    message: str
    data: dict[str, Any] = Field(
        description="step, total_steps, train_loss, valid_loss, valid_exact_match, best_step, best_valid_loss, "
        "tokens_per_s"
    )
    step: int
    total_steps: int
    loss: float
    val_loss: float | None = Field(description="Set on the steps that ran validation")
    val_exact_match: float | None = Field(
        None, description="Share of the first `eval_exact_match_rows` validation rows generated exactly"
    )
    best_step: int | None = Field(
        None, description="On validation steps: the step of the lowest validation loss so far (what is published)"
    )
    best_val_loss: float | None = None
    output_rel_error: float | None = Field(
        None,
        description="fit_lora, last event: how much of the LoRA adapter's effect on the logits the fitted "
        "adapter misses, on fixed random-token prompts (`loss` is then the fit error of the published adapter)",
    )
    top1_agreement: float | None = Field(
        None, description="fit_lora, last event: share of positions where both adapters' top token agrees"
    )
    tokens_per_s: float = Field(description="0 for a fit_lora job, which reads no tokens")

    @classmethod
    def of(cls, job_id: str, event: JobEvent, method: str = "supervised") -> FineTuningJobEvent:
        """`method`: the job's; a fit_lora job's loss is its relative fit error."""
        val = "" if event.val_loss is None else f", validation loss={event.val_loss:.4f}"
        if event.val_exact_match is not None:
            val += f", validation exact match={event.val_exact_match:.3f}"
        if event.best_step is not None:
            val += f", best step {event.best_step}"
        if event.output_rel_error is not None and event.top1_agreement is not None:
            val += f", output error={event.output_rel_error:.4f}, top-1 agreement={event.top1_agreement:.3f}"
        loss = "fit error" if method == "fit_lora" else "training loss"
        return cls(
            # A worker that re-runs the job restarts at step 1, later: the time tells them apart.
            id=f"ftevent-{job_id.removeprefix('ftjob-')}-{round(event.time * 1000)}-{event.step}",
            created_at=event.time,
            message=f"Step {event.step}/{event.total_steps}: {loss}={event.loss:.4f}{val}",
            data={
                "step": event.step,
                "total_steps": event.total_steps,
                "train_loss": event.loss,
                "valid_loss": event.val_loss,
                "valid_exact_match": event.val_exact_match,
                "best_step": event.best_step,
                "best_valid_loss": event.best_val_loss,
                "output_rel_error": event.output_rel_error,
                "top1_agreement": event.top1_agreement,
                "tokens_per_s": event.tokens_per_s,
            },
            step=event.step,
            total_steps=event.total_steps,
            loss=event.loss,
            val_loss=event.val_loss,
            val_exact_match=event.val_exact_match,
            best_step=event.best_step,
            best_val_loss=event.best_val_loss,
            output_rel_error=event.output_rel_error,
            top1_agreement=event.top1_agreement,
            tokens_per_s=event.tokens_per_s,
        )


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent] = Field(description="Oldest first; the newest events are kept")
    has_more: Literal[False] = Field(False, description="Every kept event is in the one page")


class FineTuningJobCheckpoint(BaseModel):
    """The adapter a succeeded job published: its one checkpoint, the one with the lowest
    validation loss when the job had validation rows, else its last step."""

    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="The adapter's name: pass it as `model`")
    fine_tuning_job_id: str
    step_number: int = Field(description="The step the published checkpoint was taken at")
    metrics: dict[str, float | None] = Field(
        description="step, train_loss (at the last step), valid_loss and valid_exact_match (of the published "
        "checkpoint); a fit_lora job's also output_rel_error and top1_agreement (train_loss is its fit error)"
    )

    @classmethod
    def of(cls, record: JobRecord, events: list[JobEvent]) -> FineTuningJobCheckpoint:
        """`events`: the job's, oldest first; the last validation event names the best step."""
        step, valid_loss, exact_match = record.step, record.val_loss, None
        validated = [e for e in events if e.best_step is not None]
        if validated:
            step, valid_loss = validated[-1].best_step, validated[-1].best_val_loss
            exact_match = next((e.val_exact_match for e in validated if e.step == step), None)
        metrics = {"step": step, "train_loss": record.loss, "valid_loss": valid_loss, "valid_exact_match": exact_match}
        fitted = [e for e in events if e.output_rel_error is not None]
        if fitted:
            metrics |= {"output_rel_error": fitted[-1].output_rel_error, "top1_agreement": fitted[-1].top1_agreement}
        return cls(
            id=f"ftckpt-{record.id.removeprefix('ftjob-')}",
            created_at=int(record.updated),
            fine_tuned_model_checkpoint=record.adapter_name,
            fine_tuning_job_id=record.id,
            step_number=step,
            metrics=metrics,
        )


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint] = Field(description="The final checkpoint of a succeeded job, else none")
    has_more: Literal[False] = False
    first_id: str | None
    last_id: str | None
