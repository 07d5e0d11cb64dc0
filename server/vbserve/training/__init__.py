"""Fine-tuning: datasets, hyperparameters, the VB-LoRA trainer, the durable job queue and
the worker that connects them. The HTTP routes build on `prepare_job` (validate an upload)
and `JobQueue` (submit, get, list, events, cancel)."""

from .data import DatasetLimits, Example, parse_jsonl
from .errors import (
    DatasetError,
    DatasetTooLargeError,
    HyperparameterError,
    JobNotFoundError,
    JobStateError,
    TooManyJobsError,
    TrainingCancelled,
    TrainingError,
)
from .hyperparams import TrainingHyperparameters
from .jobs import JobEvent, JobQueue, JobRecord, JobState, QueueLimits, jobs_url, open_job_queue, queue_limits
from .prepare import PreparedJob, TrainingLimits, prepare_job, published_bytes
from .trainer import TrainingResult, train_adapter

__all__ = [
    "DatasetError",
    "DatasetLimits",
    "DatasetTooLargeError",
    "Example",
    "HyperparameterError",
    "JobEvent",
    "JobNotFoundError",
    "JobQueue",
    "JobRecord",
    "JobState",
    "JobStateError",
    "PreparedJob",
    "QueueLimits",
    "TooManyJobsError",
    "TrainingCancelled",
    "TrainingError",
    "TrainingHyperparameters",
    "TrainingLimits",
    "TrainingResult",
    "jobs_url",
    "open_job_queue",
    "parse_jsonl",
    "prepare_job",
    "published_bytes",
    "queue_limits",
    "train_adapter",
]
