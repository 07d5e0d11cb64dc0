"""Fail fast while a backend hangs.

A backend that stops answering without refusing connections (Redis paused or swapping, a
partition that drops packets) makes every call wait for the driver's timeout, 5 s on
Redis, and requests pile up behind those calls in the server's worker threads: measured
on a paused Redis, 20 concurrent requests for an adapter the server had in memory took
5 to 20 s. A backend that refuses connections fails in a millisecond and needs none of
this.

So: once a call has failed as unavailable after waiting `slow_s` or more, the breaker
opens and every call fails at once, with the same "unavailable" error callers already
handle (the server serves what it holds in memory and answers 503 for the rest). A
background thread probes the backend every `interval_s`; the first answer closes the
breaker. No caller ever waits for a probe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(
        self,
        probe: Callable[[], object],
        unavailable: tuple[type[BaseException], ...],
        *,
        name: str,
        slow_s: float = 1.0,
        interval_s: float = 1.0,
    ) -> None:
        """probe: one cheap call to the backend (a ping), run outside the breaker.
        unavailable: the exceptions of `probe` that mean the backend is still unreachable."""
        self.probe = probe
        self.unavailable = unavailable
        self.name = name
        self.slow_s = slow_s
        self.interval_s = interval_s
        self._open = False
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._open

    @contextmanager
    def call(self, unavailable_error: Callable[[str], Exception]) -> Iterator[None]:
        """Guard one call to the backend: while open, fail at once; a call that fails as
        unavailable may open it. Either way the caller's own error is raised, built by
        `unavailable_error(reason)`."""
        if self._open:
            raise unavailable_error(f"the {self.name} timed out moments ago; failing fast, retry later")
        start = time.monotonic()
        try:
            yield
        except self.unavailable as exc:
            self.failed(time.monotonic() - start)
            raise unavailable_error(f"{type(exc).__name__}: {exc}") from exc

    def failed(self, waited_s: float) -> None:
        """A call failed as unavailable after `waited_s`: a slow failure opens the breaker."""
        if waited_s < self.slow_s:
            return
        with self._lock:
            if self._open or self._stopped:
                return
            self._open = True
        log.warning("%s failed after %.1f s: not calling it until it answers again", self.name, waited_s)
        threading.Thread(target=self._probe_until_answered, name=f"{self.name}-probe", daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._open = False

    def _probe_until_answered(self) -> None:
        while True:
            time.sleep(self.interval_s)
            if self._stopped:
                return
            try:
                self.probe()
            except self.unavailable:
                continue
            except Exception:  # any other answer is an answer
                pass
            with self._lock:
                self._open = False
            log.warning("%s answers again", self.name)
            return
