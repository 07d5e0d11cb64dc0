"""Tokenizing and chat templating beside the event loop, not in it.

Templating and encoding a prompt is CPU work linear in its size: a 1 MB chat took seconds.
Run in the event loop, it stopped every route of the process meanwhile (`/healthz` too).
Here it runs in a few threads of its own: at most `threads` prompts at once, so a flood of
huge prompts waits here rather than taking the threads that store calls and adapter loads
use, and at most `max_waiting` more wait; beyond that the request is refused like a full
engine queue (429, retry later), before its work starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .errors import APIError

T = TypeVar("T")


class TokenizerPool:
    def __init__(self, threads: int, max_waiting: int) -> None:
        # Idle threads end when the pool is garbage collected (ThreadPoolExecutor does it).
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="vbserve-tokenize")
        self._capacity = threads + max_waiting
        self._admitted = 0  # running or waiting; only touched on the event loop

    async def run(self, work: Callable[[], T]) -> T:
        """`work()` in one of the pool's threads. A caller cancelled while its work waits
        for a thread drops the work (asyncio cancels the pool's future)."""
        if self._admitted >= self._capacity:
            raise APIError("overloaded", "too many prompts are being tokenized; retry later")
        self._admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        finally:
            self._admitted -= 1
