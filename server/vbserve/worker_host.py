"""Where a training worker runs: `vbserve worker`'s process (`run_worker`), a thread of the
API's process (`EmbeddedWorker`), or a child process the API supervises (`WorkerProcess`,
the default of `vbserve serve`). Beside `app.py` and `cli.py` because, like them, it starts
services (`open_services`); the worker itself (`training.worker.Worker`) only runs jobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import threading
import time
from functools import partial
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from vbserve.services import Runtime, open_services
from vbserve.settings import Settings, get_settings
from vbserve.tenancy import store_quota
from vbserve.training.prepare import TrainingLimits
from vbserve.training.worker import Worker

log = logging.getLogger(__name__)


def run_worker(settings: Settings | None = None, *, stop: threading.Event | None = None) -> None:
    """The `vbserve worker` entry: load the model, open store and queue, run jobs until
    SIGTERM/SIGINT (or `stop`). A job running at shutdown goes back to the queue."""
    settings = settings or get_settings()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    with open_services(settings, for_training=True) as runtime:
        build_worker(runtime, runtime.model, runtime.tokenizer).run(stop)


def build_worker(runtime: Runtime, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> Worker:
    """A worker on `runtime`'s queue and store that trains `model`: the runtime's own in
    `vbserve worker`, a copy taken before the engine wrapped it in the app's thread worker.
    Tenants' own quotas bound what it publishes (the server's defaults without a registry)."""
    if runtime.jobs is None:
        raise ValueError("a worker needs the job queue, and fine-tuning is off")
    return Worker(
        runtime.jobs,
        runtime.store,
        model,
        tokenizer,
        runtime.base_model,
        limits=TrainingLimits.from_settings(runtime.settings),
        quota_of=partial(store_quota, runtime.settings, runtime.tenants),
    )


class EmbeddedWorker:
    """`run_worker` in a daemon thread of this process, or `worker.run` for a `Worker` the
    caller built (the API app builds one over a copy of an injected model, store and
    queue); `stop()` ends it after the current training step (the job goes back to the
    queue). A crash here is a crash of the process: the API runs `WorkerProcess`."""

    def __init__(self, settings: Settings, worker: Worker | None = None) -> None:
        self._stop = threading.Event()
        target = partial(worker.run, self._stop) if worker else partial(run_worker, settings, stop=self._stop)
        self._thread = threading.Thread(target=target, name="vbserve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._thread.join(timeout)


def start_embedded_worker(settings: Settings, worker: Worker | None = None) -> EmbeddedWorker:
    """Start a worker thread: `worker` if given, else one with its own model copy (loaded
    in the thread, so the API starts without waiting for it)."""
    return EmbeddedWorker(settings, worker)


# A child that dies sooner than this after its start counts as crash-looping: the next
# restart waits twice as long as the last (up to MAX_RESTART_DELAY_S), so a worker that
# cannot start (a bad model path) does not spin.
HEALTHY_RUN_S = 60.0
MAX_RESTART_DELAY_S = 60.0


# `nice(1)` of the training worker process (`WorkerProcess`): serving comes first.
TRAINING_NICE = 10


class WorkerProcess:
    """`run_worker(settings)` in a child process, started with `spawn` (a fork of the API
    would copy its threads' locks and the engine's memory), supervised by a thread of
    this process: when the child dies (SIGKILL, the kernel's OOM killer, a segfault) it is
    started again after `restart_delay_s`; its job's lease lapses and the job runs again
    as a new attempt, or ends failed past `max_attempts` (`jobs.base`). The child opens its
    own store, queue and tenant registry from the settings and loads its own model, and
    makes itself the kernel's first choice when memory runs out. `stop()` sends SIGTERM
    (the job goes back to the queue) and waits, then kills."""

    def __init__(self, settings: Settings, *, restart_delay_s: float = 1.0) -> None:
        self._settings = settings
        self._restart_delay_s = restart_delay_s
        self._context = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # no restart once stop() has begun
        self.restarts = 0
        self.process = self._spawn()
        self._supervisor = threading.Thread(target=self._supervise, name="vbserve-worker-supervisor", daemon=True)
        self._supervisor.start()

    def _spawn(self) -> multiprocessing.process.BaseProcess:
        level = logging.getLogger().getEffectiveLevel()
        process = self._context.Process(
            target=_worker_process_main, args=(self._settings, level, os.getpid()), name="vbserve-worker", daemon=True
        )
        process.start()
        log.info("training worker process %d started", process.pid)
        return process

    def _supervise(self) -> None:
        delay = self._restart_delay_s
        while True:
            process, started = self.process, time.monotonic()
            process.join()
            if self._stopping.is_set():
                return
            log.error(
                "training worker process %d exited with %s; starting another in %.0f s (its job runs again once "
                "its lease lapses)",
                process.pid,
                process.exitcode,
                delay,
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.process = self._spawn()
                self.restarts += 1
            healthy = time.monotonic() - started > HEALTHY_RUN_S
            delay = self._restart_delay_s if healthy else min(2 * delay, MAX_RESTART_DELAY_S)

    def stop(self, timeout: float | None = None) -> None:
        with self._lock:
            self._stopping.set()
            process = self.process
        if process.is_alive():
            process.terminate()  # SIGTERM: run_worker puts its job back in the queue and returns
            process.join(timeout)
            if process.is_alive():
                log.warning("training worker process %d did not stop in %s s; killing it", process.pid, timeout)
                process.kill()
                process.join()
        self._supervisor.join(timeout)


def _worker_process_main(settings: Settings, log_level: int, parent_pid: int) -> None:
    """The child's entry point (module level, so `spawn` can import it)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _die_with_parent(parent_pid)
    # Out of memory, the kernel kills the process with the highest score: make that this
    # child (training is what grows), never the API. Raising one's own score needs no
    # privilege.
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")
    # And the scheduler's last choice beside serving: a running job slowed completions from
    # 0.2 to 0.7 s at the same priority (measured in a review on the 2-core machine).
    os.nice(TRAINING_NICE)
    run_worker(settings)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGTERM this process when its parent dies (even by SIGKILL), so a crashed
    API leaves no orphan training on. Elsewhere the child outlives a killed parent."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
