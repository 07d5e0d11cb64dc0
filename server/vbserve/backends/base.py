"""What every stateful backend (adapter store, job queue, file store, tenant registry)
does the same way: `ping`, an idempotent `close`, use as a context manager, and a guard
around each call to storage that turns the driver's "cannot reach it" exceptions into
the component's own `BackendUnavailableError`, fails fast while the storage hangs (the
circuit breaker) and reports how long the call took.

A component subclasses `Backend`, sets the class attributes below, and implements
`_ping` and `_close`; its public methods wrap storage calls in `with self._guard(op):`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar, Self

from .breaker import CircuitBreaker
from .errors import BackendUnavailableError


class Backend(ABC):
    #: What the unavailable error names ("store", "jobs", "files", "tenants").
    backend: ClassVar[str]
    #: For log lines: "adapter store", "job queue", ...
    description: ClassVar[str]
    #: The error raised when the storage cannot be reached (a subclass keeps its API's type).
    unavailable_error: ClassVar[type[BackendUnavailableError]] = BackendUnavailableError
    #: Driver exceptions that mean "the storage cannot be reached right now".
    unavailable_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Open the circuit breaker after a slow failure (see breaker.py). The job queue does
    #: not: its calls come from workers and admin routes, never from the serving path.
    fail_fast: ClassVar[bool] = True

    def __init__(self) -> None:
        self._closed = False
        #: Called with (operation, seconds) after each guarded call (metrics).
        self.on_latency: Callable[[str, float], None] | None = None
        self._breaker = (
            CircuitBreaker(self._ping, self.unavailable_errors, name=self.description) if self.fail_fast else None
        )

    def ping(self) -> None:
        """Return if the storage answers, else raise the unavailable error."""
        with self._guard("ping"):
            self._ping()

    def close(self) -> None:
        """Release connections. Later calls raise the unavailable error."""
        if not self._closed:
            self._closed = True
            if self._breaker is not None:
                self._breaker.stop()
            self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unavailable(self, reason: str) -> BackendUnavailableError:
        return self.unavailable_error(self.backend, reason)

    @contextmanager
    def _guard(self, operation: str = "call") -> Iterator[None]:
        if self._closed:
            raise self._unavailable(f"the {self.description} is closed")
        start = time.perf_counter()
        try:
            if self._breaker is not None:
                with self._breaker.call(self._unavailable):
                    yield
            else:
                try:
                    yield
                except self.unavailable_errors as exc:
                    raise self._unavailable(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self.on_latency is not None:
                self.on_latency(operation, time.perf_counter() - start)

    @abstractmethod
    def _ping(self) -> None:
        """One cheap call to the storage (also the breaker's probe)."""

    @abstractmethod
    def _close(self) -> None: ...
