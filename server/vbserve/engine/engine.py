"""The engine: iteration-level (continuous) batching over many adapters.

One thread runs the loop. Each iteration: take new requests, drop cancelled and timed-out
ones, run at most one prefill forward of at most `prefill_token_budget` prompt tokens
(whole prompts of newly admitted requests, or the next chunk of one long prompt), then one
decode step for every running request. Requests join and leave between steps; a batch
mixes adapters and base-only rows freely.

Rows of the KV cache are kept dense: running requests own rows 0..n-1, new ones are
appended, and a leaving request's row is filled by the last row. A prompt longer than the
budget is prefilled chunk by chunk in the batch's last row, which running requests never
reach while it is in use, and moves to row n when its prompt is complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import torch
import xgrammar
from transformers import PreTrainedTokenizerBase

from vbserve.model import BaseModelSpec

from .adapters import AdapterCache, AdapterKey, CacheKey, SlotTable
from .contract import (
    EngineError,
    FinalResult,
    GenerationRequest,
    InvalidRequestError,
    OverloadedError,
    RequestFailedError,
    TokenEvent,
    Usage,
)
from .detokenizer import IncrementalDetokenizer
from .grammar import Grammars, mask_logits
from .model_runner import ModelRunner
from .sampling import NO_TOKEN, sample_next_tokens, token_logprobs

log = logging.getLogger(__name__)

Event = TokenEvent | FinalResult


class RequestHandle:
    """What `Engine.submit` returns: an async stream of TokenEvents ending in a FinalResult."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def _push(self, event: Event) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the caller's event loop is gone: nobody listens any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the slot is freed on the next step."""
        self.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, FinalResult):
                return

    async def result(self) -> FinalResult:
        async for event in self:
            if isinstance(event, FinalResult):
                return event
        raise AssertionError("unreachable: the stream always ends with a FinalResult")


@dataclass
class _Sampled:
    """One row's draw: the token (NO_TOKEN if the row had no valid distribution) and, when
    its request asked, the logprobs."""

    token: int
    logprob: float | None
    top_logprobs: dict[int, float] | None


@dataclass
class _Sequence:
    handle: RequestHandle
    adapter_key: CacheKey | None
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    deadline: float | None
    matcher: xgrammar.GrammarMatcher | None = None  # the request's response_format, this sample's progress in it
    row: int = -1
    slot: int = -1
    length: int = 0  # tokens in the KV cache (less than the prompt while it is prefilled in chunks)
    output: list[int] = field(default_factory=list)
    first_token_at: float | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        base_model: BaseModelSpec,
        tokenizer: PreTrainedTokenizerBase,
        adapters: AdapterCache | None,
        grammars: Grammars,
        *,
        max_batch_size: int,
        max_queue: int,
        max_new_tokens_limit: int,
        prefill_token_budget: int,
        max_n: int = 1,
        on_step: Callable[[dict], None] | None = None,
    ) -> None:
        self.runner = runner
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.adapters = adapters
        # The slot table is the engine thread's own (see `SlotTable`); the cache is shared.
        self.slots = SlotTable(runner.layers, adapters) if adapters is not None else None
        self.grammars = grammars
        self.max_batch_size = min(max_batch_size, runner.max_rows)
        self.max_queue = max_queue
        self.max_new_tokens_limit = max_new_tokens_limit
        self.prefill_token_budget = prefill_token_budget
        self.max_n = max_n  # samples one request may ask for (`submit_n`)
        self.on_step = on_step or (lambda stats: None)
        self._inbox: queue.Queue[_Sequence] = queue.Queue()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # decoding, in row order
        self._chunked: _Sequence | None = None  # a long prompt being prefilled chunk by chunk
        self._prefilling: list[_Sequence] = []  # admitted this iteration, not yet running
        self._pending = 0  # submitted, not yet running (inbox + waiting), for the queue bound
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- API -------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return self._pending

    @property
    def running_count(self) -> int:
        return len(self._holding_rows())

    def resident_adapters(self, tenant: str) -> list[tuple[str, int, bool]]:
        """The tenant's adapters composed in this process's cache: (name, version, whether a
        batch slot holds it now). Any thread: the slots are a snapshot, at worst one step
        old, which is all a display needs."""
        if self.adapters is None or self.slots is None:
            return []
        in_slots = self.slots.held()
        return sorted((key.name, key.version, key in in_slots) for key in self.adapters.composed_adapters(tenant))

    def validate(self, request: GenerationRequest) -> None:
        """Everything checkable without I/O; raises InvalidRequestError before any compute."""
        ids = request.prompt_ids
        if not isinstance(ids, list) or not ids:
            raise InvalidRequestError("prompt", "must not be empty")
        vocab = self.base_model.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError("prompt", f"token ids must be integers in [0, {vocab})")
        request.sampling.validate(self.max_new_tokens_limit, vocab)
        budget = self.base_model.max_len
        if len(ids) >= budget:
            raise InvalidRequestError("prompt", f"{len(ids)} tokens exceed the context length {budget}")
        if len(ids) + request.sampling.max_new_tokens > budget:
            raise InvalidRequestError(
                "max_new_tokens",
                f"prompt ({len(ids)}) + max_new_tokens ({request.sampling.max_new_tokens}) exceeds the context length {budget}",
            )
        if request.timeout_s is not None and not 0 < request.timeout_s <= 3600:
            raise InvalidRequestError("timeout", "must be in (0, 3600] seconds")

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate, resolve the adapter, and queue. Raises EngineError subclasses
        (InvalidRequestError, AdapterUnavailableError, OverloadedError) before any compute."""
        return (await self.submit_n(request, 1))[0]

    async def submit_n(self, request: GenerationRequest, n: int) -> list[RequestHandle]:
        """`n` independent samples of one request (OpenAI's `n`), as `submit` does one: the
        request itself and n-1 copies with their own ids and generators. A seeded request's
        copy i is seeded `seed + i` (vLLM's derivation), so the choices are reproducible. All
        n are queued or none: they count n towards the queue bound."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= min(self.max_n, self.max_queue):
            raise InvalidRequestError("n", f"must be an integer in [1, {min(self.max_n, self.max_queue)}]")
        self.validate(request)
        key = None
        if request.adapter is not None:
            if self.adapters is None:
                raise InvalidRequestError("model", "this engine serves no adapters")
            key = await asyncio.to_thread(self.adapters.resolve, request.adapter)
        grammar = await self.grammars.compile(request.response_format) if request.response_format else None
        with self._pending_lock:
            if self._pending + n > self.max_queue:
                raise OverloadedError("queue", f"{self._pending} requests already waiting; retry later")
            self._pending += n
        loop = asyncio.get_running_loop()
        handles = []
        for i in range(n):
            sibling = request if i == 0 else _sibling(request, i)
            handle = RequestHandle(sibling, loop)
            sp = sibling.sampling
            generator = None
            if sp.temperature > 0:
                generator = torch.Generator().manual_seed(sp.seed if sp.seed is not None else random.getrandbits(63))
            seq = _Sequence(
                handle=handle,
                adapter_key=key,
                detok=IncrementalDetokenizer(self.tokenizer, sp.stop, request.prompt_ids[-6:]),
                generator=generator,
                deadline=request.arrival + request.timeout_s if request.timeout_s else None,
                matcher=xgrammar.GrammarMatcher(grammar) if grammar else None,
            )
            self._inbox.put(seq)
            handles.append(handle)
        return handles

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)  # type: ignore[arg-type]  # wakes the loop
        self._thread.join(timeout=10)

    # -- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # a bug must not kill the engine for everyone: fail the batch
                log.exception("engine step failed; failing the running requests")
                holding = self._holding_rows()
                # A failed prefill's requests left the queue but hold no row yet: fail them too.
                failed = holding + [s for s in self._prefilling if not any(s is h for h in holding)]
                self._prefilling = []
                for seq in failed:
                    self._finish(seq, "error", EngineError("engine", "internal error during generation"))

    def _step(self) -> None:
        idle = not self._holding_rows() and not self._waiting
        self._take_inbox(block=idle)
        now = time.monotonic()
        for seq in [*self._waiting, *self._holding_rows()]:
            if seq.handle.cancelled.is_set():
                self._finish(seq, "cancelled")
            elif seq.deadline is not None and now > seq.deadline:
                self._finish(seq, "timeout")
        prefill = [self._chunked] if self._chunked else self._admit()
        if prefill:
            self._prefilling = prefill
            self._prefill(prefill)
            self._prefilling = []
        if self._running:
            self._decode()
        elif self._waiting and not prefill:
            time.sleep(0.002)  # only requests whose adapters are still loading: don't spin
        stats = {
            "running": self.running_count,
            "waiting": self._pending,
            "running_adapters": _adapter_names(self._holding_rows()),
            "waiting_adapters": _adapter_names(self._waiting),
        }
        try:
            self.on_step(stats)
        except Exception:  # an observer's bug must not fail the requests it observes
            log.exception("engine on_step callback failed")

    def _holding_rows(self) -> list[_Sequence]:
        return [*self._running, *([self._chunked] if self._chunked else [])]

    def _take_inbox(self, block: bool) -> None:
        try:
            seq = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            while True:
                if seq is not None:
                    self._waiting.append(seq)
                    if seq.adapter_key is not None:
                        self.adapters.want(seq.adapter_key)
                seq = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> list[_Sequence]:
        """Waiting requests (FIFO, skipping ones whose adapter is still loading) that fit
        in the batch, an adapter slot, and this iteration's prefill token budget, with their
        KV rows assigned. A prompt longer than the budget is only ever admitted alone."""
        admitted: list[_Sequence] = []
        tokens = 0
        for seq in list(self._waiting):
            if len(self._running) + len(admitted) >= self.max_batch_size:
                break
            n = len(seq.request.prompt_ids)
            if admitted and tokens + n > self.prefill_token_budget:
                break
            if seq.adapter_key is not None:
                seq.adapter_key = self.adapters.current(seq.adapter_key)
                state = self.adapters.state(seq.adapter_key)
                if isinstance(state, EngineError):
                    self._finish(seq, "error", state)
                    continue
                if state != "ready":
                    continue
                slot = self.slots.acquire(seq.adapter_key)
                if slot is None:
                    continue
                seq.slot = slot
                self.adapters.unwant(seq.adapter_key)
            self._waiting.remove(seq)
            with self._pending_lock:
                self._pending -= 1
            admitted.append(seq)
            tokens += n
        if tokens > self.prefill_token_budget:
            # Chunked in the batch's last row: running requests stay below it (the chunked
            # one counts towards the batch size), so their rows stay dense.
            self._chunked = admitted[0]
            self._chunked.row = self.max_batch_size - 1
        else:
            for i, seq in enumerate(admitted):
                seq.row = len(self._running) + i
        return admitted

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """One forward that writes each sequence's next prompt chunk (at most the budget) into
        its KV row; rows of `seqs` are contiguous. Sequences whose prompt is now complete
        emit their first token and start decoding."""
        chunks = [s.request.prompt_ids[s.length : s.length + self.prefill_token_budget] for s in seqs]
        width = max(len(c) for c in chunks)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, chunk in enumerate(chunks):
            ids[i, : len(chunk)] = torch.tensor(chunk)
        positions = torch.tensor([[s.length] for s in seqs]) + torch.arange(width)
        last = torch.tensor([len(c) - 1 for c in chunks])
        logits = self.runner.forward(seqs[0].row, ids, positions, last, self._slots(seqs))
        for seq, chunk in zip(seqs, chunks, strict=True):
            seq.length += len(chunk)
        if seqs[0] is self._chunked:  # admitted alone, see `_admit`
            if self._chunked.length < len(self._chunked.request.prompt_ids):
                return
            self._chunked = None
            self._move_row(seqs[0], len(self._running))
        self._running.extend(seqs)
        self._emit(seqs, logits)

    def _decode(self) -> None:
        seqs = self._running
        ids = torch.tensor([[s.output[-1]] for s in seqs])
        positions = torch.tensor([[s.length] for s in seqs])
        logits = self.runner.decode(ids, positions, self._slots(seqs))
        for s in seqs:
            s.length += 1
        self._emit(list(seqs), logits)

    def _slots(self, seqs: list[_Sequence]) -> torch.Tensor:
        return torch.tensor([s.slot for s in seqs], dtype=torch.long)

    def _emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample, stream and maybe finish each sequence's next token. Whatever goes wrong
        with one sequence here (its sampling, its detokenizing) ends that sequence alone."""
        sampled = self._sample(seqs, logits)
        now = time.monotonic()
        for seq, row in zip(seqs, sampled, strict=True):
            try:
                if isinstance(row, Exception):
                    raise row
                reason = self._take_token(seq, row, now)
            except Exception as exc:
                self._finish(seq, "error", _row_error(seq, exc))
                continue
            if reason is not None:
                self._finish(seq, reason)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[_Sampled | Exception]:
        """Each row's token and logprobs: batched, or row by row when the batch raised, so
        that only the row that broke it fails. Redoing a row is safe for seeded requests:
        the draws come after all batched work and do not raise (`sample_next_tokens`), so
        no generator has advanced when the batch raises."""
        try:
            return self._sample_rows(seqs, logits)
        except Exception:
            log.exception("sampling a batch of %d failed; sampling its rows one by one", len(seqs))
        rows: list[_Sampled | Exception] = []
        for i, seq in enumerate(seqs):
            try:
                rows += self._sample_rows([seq], logits[i : i + 1])
            except Exception as exc:
                rows.append(exc)
        return rows

    def _sample_rows(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[_Sampled]:
        params = [s.request.sampling for s in seqs]
        prompts = [s.request.prompt_ids for s in seqs]
        outputs = [s.output for s in seqs]
        allowed = mask_logits(logits, [s.matcher for s in seqs])  # response_format's grammars
        generators = [s.generator for s in seqs]
        tokens = sample_next_tokens(allowed, params, generators, prompts, outputs, self.base_model.eos_ids)
        chosen: list[float | None] = [None] * len(seqs)
        tops: list[dict[int, float] | None] = [None] * len(seqs)
        if any(p.logprobs for p in params):
            # A row without a token (NO_TOKEN) fails in `_take_token`; 0 just keeps the gather valid.
            logprobs, top = token_logprobs(logits, tokens.clamp(min=0), max(p.top_logprobs for p in params))
            chosen = list(logprobs)
            tops = list(top) if top else tops
        return [_Sampled(*row) for row in zip(tokens.tolist(), chosen, tops, strict=True)]

    def _take_token(self, seq: _Sequence, sampled: _Sampled, now: float) -> str | None:
        """Append and stream `seq`'s new token; the finish reason if it ends here."""
        if sampled.token == NO_TOKEN:
            raise RequestFailedError("engine", "the next-token distribution was not finite")
        p = seq.request.sampling
        token = sampled.token
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise RequestFailedError("engine", "the sampled token does not follow the response_format grammar")
        seq.output.append(token)
        seq.first_token_at = seq.first_token_at or now
        is_eos = token in p.stop_token_ids or (not p.ignore_eos and token in self.base_model.eos_ids)
        text = "" if is_eos else seq.detok.add(token)
        event = TokenEvent(len(seq.output) - 1, token, text)
        if p.logprobs:
            event.logprob = sampled.logprob
            event.top_logprobs = (
                dict(list(sampled.top_logprobs.items())[: p.top_logprobs]) if sampled.top_logprobs else None
            )
        seq.handle._push(event)
        if is_eos or seq.detok.stopped or (seq.matcher is not None and seq.matcher.is_terminated()):
            return "stop"
        if len(seq.output) >= p.max_new_tokens or seq.length + 1 >= self.runner.max_len:
            return "length"
        return None

    def _finish(self, seq: _Sequence, reason: str, error: EngineError | None = None) -> None:
        if seq in self._waiting:
            self._waiting.remove(seq)
            with self._pending_lock:
                self._pending -= 1
            if seq.adapter_key is not None:
                self.adapters.unwant(seq.adapter_key)
        elif seq in self._running:
            self._release_row(seq)
        elif seq is self._chunked:  # its row is outside the dense range: nothing to compact
            self._chunked = None
            self.runner.cache.clear_row(seq.row)
        elif seq.row >= 0:  # admitted, but its prefill failed: it wrote into its row
            self.runner.cache.clear_row(seq.row)
        if seq.slot >= 0:
            self.slots.release(seq.slot)
            seq.slot = -1
        # A stop string is never streamed, and a failed request's held-back text is not final.
        tail = seq.detok.flush() if reason != "error" and not (reason == "stop" and seq.detok.stopped) else ""
        if tail:
            seq.handle._push(TokenEvent(len(seq.output), -1, tail))
        req = seq.request
        seq.handle._push(
            FinalResult(
                request_id=req.request_id,
                text=seq.detok.text,
                token_ids=list(seq.output),
                finish_reason=reason,
                usage=Usage(len(req.prompt_ids), len(seq.output)),
                adapter_version=seq.adapter_key.version if isinstance(seq.adapter_key, AdapterKey) else None,
                time_to_first_token_s=(seq.first_token_at - req.arrival) if seq.first_token_at else None,
                error=error,
            )
        )

    def _release_row(self, seq: _Sequence) -> None:
        """Free `seq`'s KV row, moving the last running row into it to keep rows dense."""
        idx = self._running.index(seq)
        last = self._running[-1]
        if last is not seq:
            self._move_row(last, seq.row)
            self._running[idx] = last
        else:
            self.runner.cache.clear_row(seq.row)
        self._running.pop()

    def _move_row(self, seq: _Sequence, row: int) -> None:
        """Move `seq`'s keys and values to `row`; both rows keep nothing of earlier requests
        (see `SlotKVCache.clear_row`)."""
        if seq.row != row:
            cache = self.runner.cache
            cache.clear_row(row)
            cache.move_row(seq.row, row, seq.length)
            cache.clear_row(seq.row)
            seq.row = row


def _sibling(request: GenerationRequest, i: int) -> GenerationRequest:
    """Copy i of `request` for `submit_n`: same prompt, settings and arrival, its own id and seed."""
    seed = request.sampling.seed
    sampling = dataclasses.replace(request.sampling, seed=None if seed is None else (seed + i) % 2**63)
    return dataclasses.replace(request, sampling=sampling, request_id=uuid.uuid4().hex)


def _row_error(seq: _Sequence, exc: Exception) -> EngineError:
    """The error that ends `seq` alone. An unexpected exception is logged here, once."""
    if isinstance(exc, EngineError):
        log.warning("request %s failed: %s", seq.request.request_id, exc)
        return exc
    log.error("request %s failed; the rest of its batch goes on", seq.request.request_id, exc_info=exc)
    return RequestFailedError("engine", "internal error while generating this request")


def _adapter_names(sequences: Iterable[_Sequence]) -> list[str]:
    """Distinct `tenant/name` of the adapters the sequences use, sorted (for metrics)."""
    return sorted({f"{a.tenant}/{a.name}" for a in (seq.request.adapter for seq in sequences) if a is not None})
