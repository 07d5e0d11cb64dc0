"""The worker: takes jobs from the queue, trains, publishes the adapter to the store.

`run_worker(settings)` is the `vbserve worker` process: it loads its own copy of the base
model (training hooks its linear layers, which must never happen to a model that is
serving) and loops until SIGTERM/SIGINT. The API process runs the same loop as its
embedded worker in a child process (`WorkerProcess`), so that a job that runs out of
memory or crashes the interpreter takes down the child, never the API; the API restarts
the child, and the job runs again once its lease lapses (up to `max_attempts`).
`start_embedded_worker(settings, worker)` runs a `Worker` in a thread of this process
instead, for tests that hand the app an in-memory model a child could not load.

How a job ends (see `jobs.base` for the states):
- bad input (dataset, hyperparameters, an adapter the store refuses): `failed` at once,
  with the typed error's `field: reason` as the message; retrying would fail the same way.
- the store, queue or tenant registry unreachable: `retry` (queued again, counted as an
  attempt).
- cancel requested: `cancelled`, nothing published. Worker shutting down: queued again
  without counting an attempt. Lease lost (this worker stalled and another took over):
  drop the job silently, the other worker owns it now.
- the adapter would take the tenant over its quota: `failed` with `quota: ...` (the
  store checks the tenant's quota atomically with the put, as for an upload).
- anything else (a bug, out of memory): `failed`, logged with its traceback.
- success: mark the bank id, `store.put` (atomic, a new version), `finish(succeeded)`.
  A job removed meanwhile (its tenant was deleted: `finish` finds no job) withdraws the
  version it put (see `vbserve.tenancy.deletion` for why that and the tenant sweep
  together leave nothing behind).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vbserve.backends import BackendUnavailableError
from vbserve.model import BaseModelSpec
from vbserve.tenancy import withdraw_adapter
from vbserve_store import (
    AdapterError,
    AdapterNotFoundError,
    AdapterStore,
    QuotaExceededError,
    VBLoRAAdapter,
    decode_lora,
)
from vbserve_store.store import AdapterRecord, StoreQuota

from .errors import JobNotFoundError, TrainingCancelled, TrainingError
from .fit import FitProgress, fit_vblora, output_agreement
from .hyperparams import FIT_STEPS, TrainingHyperparameters
from .jobs import ClaimedJob, JobEvent, JobQueue, JobState
from .prepare import TrainingLimits, load_frozen_bank, prepare_fit, prepare_job
from .trainer import Progress, train_adapter

log = logging.getLogger(__name__)

# Progress is written at most this often (and on validation steps and the last step), so
# a fast model does not turn every optimizer step into a queue write.
PROGRESS_INTERVAL_S = 1.0
# The lease thread beats at least this often, so a cancel reaches the trainer's
# `should_stop` within about this long even under a long lease.
CANCEL_POLL_S = 2.0


class Worker:
    """Runs jobs one at a time on one model. Not thread-safe: one worker per model."""

    def __init__(
        self,
        queue: JobQueue,
        store: AdapterStore,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        base_model: BaseModelSpec,
        *,
        limits: TrainingLimits | None = None,
        worker_id: str | None = None,
        quota_of: Callable[[str], StoreQuota] | None = None,
    ) -> None:
        """base_model: `model` described (`describe_model`), what a job is checked
        against; quota_of: a tenant's store quota at publish time (`tenancy.store_quota`);
        None: no quota."""
        self.queue = queue
        self.quota_of = quota_of or (lambda tenant: StoreQuota())
        self.store = store
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits or TrainingLimits()
        self.base_model = base_model
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad if pad is not None else 0

    def run(self, stop: threading.Event, *, poll_s: float = 1.0) -> None:
        """Claim and run jobs until `stop` is set."""
        log.info("worker %s waiting for jobs", self.worker_id)
        while not stop.is_set():
            try:
                job = self.queue.claim(self.worker_id, poll_s)
            except BackendUnavailableError as exc:
                log.warning("job queue unavailable: %s", exc)
                stop.wait(poll_s)
                continue
            if job is not None:
                self.run_job(job, stop)

    def run_job(self, job: ClaimedJob, stop: threading.Event | None = None) -> None:
        """Run one claimed job to a final state (or back to the queue; see the module doc)."""
        stop = stop or threading.Event()
        log.info(
            "job %s: attempt %d for %s/%s", job.id, job.record.attempts, job.record.tenant, job.record.adapter_name
        )
        with _Lease(self.queue, job) as lease:
            try:
                self._run(job, lease, stop)
            except BackendUnavailableError as exc:  # could not even record the outcome
                log.warning("job %s: %s; its lease will lapse and it runs again", job.id, exc)

    def _run(self, job: ClaimedJob, lease: _Lease, stop: threading.Event) -> None:
        try:
            if job.publish_bank_id and self._already_published(job):
                return
            self._train_and_publish(job, lease, stop)
        except TrainingCancelled:
            if lease.lost:
                log.warning(
                    "job %s: no longer this worker's (taken over, or removed with its tenant); dropping it", job.id
                )
            elif lease.cancel_requested:
                self.queue.finish(job, JobState.CANCELLED)
            else:
                self.queue.retry(job, "the worker shut down", count_attempt=False)
        except BackendUnavailableError as exc:  # the tenant quota is read at publish
            log.warning("job %s: %s; queued again", job.id, exc)
            self.queue.retry(job, str(exc))
        except QuotaExceededError as exc:
            self.queue.finish(job, JobState.FAILED, error=f"quota: {exc.reason}")
        except (TrainingError, AdapterError) as exc:
            self.queue.finish(job, JobState.FAILED, error=str(exc))
        except Exception as exc:
            log.exception("job %s failed", job.id)
            self.queue.finish(job, JobState.FAILED, error=f"internal error: {type(exc).__name__}")

    def _train_and_publish(self, job: ClaimedJob, lease: _Lease, stop: threading.Event) -> None:
        hp = job.hyperparameters
        frozen_bank = None if hp.bank_id is None else load_frozen_bank(self.store, hp.bank_id)

        def should_stop() -> bool:
            return lease.lost or lease.cancel_requested or stop.is_set()

        reporter = _Reporter(self.queue, job, lease)
        if hp.method == "fit_lora":
            adapter = self._fit(job, hp, frozen_bank, reporter, should_stop)
        else:
            adapter = self._train(job, hp, frozen_bank, reporter, should_stop)
        lease.beat()  # a cancel that arrived during the last step still wins
        if lease.lost or lease.cancel_requested:
            raise TrainingCancelled()
        if not self.queue.mark_publishing(job, adapter.bank_id):
            lease.lost = True
            raise TrainingCancelled()
        tenant = job.record.tenant
        record = self.store.put(tenant, job.record.adapter_name, adapter, quota=self.quota_of(tenant))
        if self.queue.finish(job, JobState.SUCCEEDED, adapter_version=record.version):
            log.info("job %s: published %s/%s v%d", job.id, record.tenant, record.name, record.version)
        else:
            self._withdraw_if_removed(job, record)

    def _train(
        self,
        job: ClaimedJob,
        hp: TrainingHyperparameters,
        frozen_bank: torch.Tensor | None,
        reporter: _Reporter,
        should_stop: Callable[[], bool],
    ) -> VBLoRAAdapter:
        prepared = prepare_job(
            self.base_model,
            self.tokenizer,
            hp,
            job.training_file,
            job.validation_file,
            limits=self.limits,
            frozen_bank=frozen_bank,
        )
        return train_adapter(
            self.model,
            prepared.train,
            hp,
            prepared.config,
            val_examples=prepared.validation,
            pad_token_id=self.pad_token_id,
            on_progress=reporter,
            should_stop=should_stop,
            max_batch_tokens=self.limits.max_batch_tokens,
            frozen_bank=frozen_bank,
        ).adapter

    def _fit(
        self,
        job: ClaimedJob,
        hp: TrainingHyperparameters,
        frozen_bank: torch.Tensor | None,
        reporter: _Reporter,
        should_stop: Callable[[], bool],
    ) -> VBLoRAAdapter:
        """A fit_lora job: its training file is the source LoRA adapter's blob, taken when
        the job was created (as a training job keeps its own copy of its files)."""
        source = decode_lora(job.training_file, max_bytes=len(job.training_file))
        config = prepare_fit(self.base_model, hp, source, limits=self.limits, frozen_bank=frozen_bank)
        steps = hp.max_steps or FIT_STEPS

        def on_progress(progress: FitProgress) -> None:
            if progress.step < steps:  # the last report is the published adapter's, below
                reporter(Progress(progress.step, steps, progress.rel_error, tokens_per_s=0.0))

        result = fit_vblora(
            source,
            config,
            steps=steps,
            lr_bank=hp.lr_bank,
            lr_logits=hp.lr_logits,
            seed=hp.seed,
            frozen_bank=frozen_bank,
            save_dtype=hp.torch_save_dtype,
            on_progress=on_progress,
            should_stop=should_stop,
        )
        agreement = output_agreement(self.model, source, result.adapter, seed=hp.seed)
        log.info(
            "job %s: fit error %.4f, output error %.4f, top-1 agreement %.3f",
            job.id,
            result.rel_error,
            agreement.rel_error,
            agreement.top1_agreement,
        )
        reporter(
            Progress(
                steps,
                steps,
                result.rel_error,
                tokens_per_s=0.0,
                output_rel_error=agreement.rel_error,
                top1_agreement=agreement.top1_agreement,
            )
        )
        return result.adapter

    def _withdraw_if_removed(self, job: ClaimedJob, record: AdapterRecord) -> None:
        """`finish` refused: either another worker took the job over (it finds this
        version by its bank id and finishes the job with it), or the job was removed with
        its tenant: then this version must not stay."""
        try:
            self.queue.get(job.record.tenant, job.id)
        except JobNotFoundError:
            withdraw_adapter(self.store, record.tenant, record.name, record)
            log.warning("job %s: its tenant was deleted while publishing; %s withdrawn", job.id, record.name)

    def _already_published(self, job: ClaimedJob) -> bool:
        """An earlier attempt died after `store.put` but before `finish`: if the store
        holds the bank it was publishing, that put went through; finish without training."""
        try:
            record = self.store.get_record(job.record.tenant, job.record.adapter_name)
        except AdapterNotFoundError:
            return False
        # A shared-bank family's adapters all have one bank id: a version put before this
        # job was created has it too, and is not this job's.
        if record.bank_id != job.publish_bank_id or record.updated < job.record.created:
            return False
        self.queue.finish(job, JobState.SUCCEEDED, adapter_version=record.version)
        return True


class _Lease:
    """Renews a job's lease from a background thread (training steps may be longer than a
    lease) and remembers what the heartbeats said."""

    def __init__(self, queue: JobQueue, job: ClaimedJob) -> None:
        self.queue = queue
        self.job = job
        self.lost = False
        self.cancel_requested = job.record.cancel_requested
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job.id}", daemon=True)

    def beat(self) -> None:
        try:
            hb = self.queue.heartbeat(self.job)
        except BackendUnavailableError as exc:
            log.warning("heartbeat of %s failed: %s", self.job.id, exc)
            return
        self.lost = self.lost or not hb.owned
        self.cancel_requested = self.cancel_requested or hb.cancel_requested

    def _loop(self) -> None:
        while not self._done.wait(min(self.queue.limits.lease_s / 3, CANCEL_POLL_S)):
            self.beat()

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._done.set()
        self._thread.join()


class _Reporter:
    """The trainer's `on_progress`: throttled writes of progress and events to the queue."""

    def __init__(self, queue: JobQueue, job: ClaimedJob, lease: _Lease) -> None:
        self.queue, self.job, self.lease = queue, job, lease
        self._last = 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.time()
        routine = progress.val_loss is None and progress.step not in (1, progress.total_steps)
        if routine and now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last = now
        val = "" if progress.val_loss is None else f", val loss {progress.val_loss:.4f}"
        log.info(
            "job %s: step %d/%d, loss %.4f%s, %.0f tokens/s",
            self.job.id,
            progress.step,
            progress.total_steps,
            progress.loss,
            val,
            progress.tokens_per_s,
        )
        event = JobEvent(
            progress.step,
            progress.total_steps,
            progress.loss,
            progress.tokens_per_s,
            progress.val_loss,
            now,
            val_exact_match=progress.val_exact_match,
            best_step=progress.best_step,
            best_val_loss=progress.best_val_loss,
            output_rel_error=progress.output_rel_error,
            top1_agreement=progress.top1_agreement,
        )
        try:
            if not self.queue.report(self.job, event):
                self.lease.lost = True
        except BackendUnavailableError as exc:  # progress is best effort; the lease decides ownership
            log.warning("progress of %s not recorded: %s", self.job.id, exc)
