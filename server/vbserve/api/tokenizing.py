"""Tokenizing and chat templating beside the event loop, not in it.

Templating and encoding a prompt is CPU work linear in its size. Run in the event loop, it
stopped every route of the process meanwhile (`/healthz` too): a 1 MB chat of 23,000
messages, 15 s. Here it runs in a few threads of its own: at most `threads` prompts at
once, so a flood of huge prompts waits here rather than taking the threads that store calls
and adapter loads use, and at most `max_waiting` more wait; beyond that the request is
refused like a full engine queue (429, retry later), before its work starts.

Each thread tokenizes with its own copy of the tokenizer. A Hugging Face fast tokenizer is
not safe to share between threads: `encode(..., split_special_tokens=...)` sets that flag
on the shared Rust tokenizer and then encodes with the GIL released, so another thread can
flip it in between (measured: 80 of 400 encodes from two threads came out wrong). A chat
message's `<|im_end|>` would then be read as the control token, the injection that
`routers.openai._chat_prompt_ids` prevents.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from .errors import APIError

T = TypeVar("T")

_this_thread = threading.local()


def _own_copy(tokenizer: PreTrainedTokenizerBase, nice: int) -> None:
    _this_thread.tokenizer = copy.deepcopy(tokenizer)  # SmolLM2's: 0.2 s, once per thread
    if nice:
        # Linux schedules threads one by one: this thread alone yields to the engine and to
        # prompt tokenizing (elsewhere the call fails and the thread runs at normal priority).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def _with_own_tokenizer(work: Callable[[PreTrainedTokenizerBase], T]) -> T:
    return work(_this_thread.tokenizer)


class TokenizerPool:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        threads: int,
        max_waiting: int,
        *,
        nice: int = 0,
        what: str = "prompts",
    ) -> None:
        """`nice`: the threads' scheduling priority, as `nice(1)` (Linux); `what` names the
        work in the 429 when the pool is full."""
        # Idle threads end when the pool is garbage collected (ThreadPoolExecutor does it).
        self._executor = ThreadPoolExecutor(
            threads, thread_name_prefix="vbserve-tokenize", initializer=_own_copy, initargs=(tokenizer, nice)
        )
        self._what = what
        self._capacity = threads + max_waiting
        self._admitted = 0  # running or waiting; only touched on the event loop

    async def run(self, work: Callable[[PreTrainedTokenizerBase], T]) -> T:
        """`work(tokenizer)` in one of the pool's threads, with that thread's tokenizer. A
        caller cancelled while its work waits for a thread drops the work (asyncio cancels
        the pool's future)."""
        if self._admitted >= self._capacity:
            raise APIError("overloaded", f"too many {self._what} are being tokenized; retry later")
        self._admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, _with_own_tokenizer, work)
        finally:
            self._admitted -= 1
