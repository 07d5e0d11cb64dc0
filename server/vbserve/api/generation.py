"""Between the HTTP routes and the engine: build the engine request, run it, stream it.

Both API dialects (OpenAI and LoRAX/TGI) go through here, so cancellation on client
disconnect, metrics and error mapping are written once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel

from vbserve.engine import (
    AdapterRef,
    EngineError,
    FinalResult,
    GenerationRequest,
    MixtureRef,
    RequestHandle,
    TokenEvent,
)

from .deps import Services
from .errors import APIError, from_engine_error

Event = TokenEvent | FinalResult


@dataclass
class Outcome:
    """A finished generation: the engine's result plus its token events (for logprobs)."""

    result: FinalResult
    tokens: list[TokenEvent] = field(default_factory=list)


def adapter_ref(services: Services, tenant: str, model: str | None) -> AdapterRef | None:
    """`model` names an adapter of the tenant, or the base model (also when omitted)."""
    if not model or model == services.model_name:
        return None
    return AdapterRef(tenant, model)


def request_adapter(
    services: Services, tenant: str, model: str | None, model_field: str, mixture: MixtureRef | None
) -> AdapterRef | MixtureRef | None:
    """The request's adapter: `mixture` if it asks for one, else `adapter_ref`. With a
    mixture, the request's own adapter field (`model_field`, holding `model`) must be the
    base model's name or omitted: one request, one recipe."""
    if mixture is None:
        return adapter_ref(services, tenant, model)
    if model and model != services.model_name:
        raise APIError(
            "invalid_request",
            f"with {mixture.field}, name the base model ({services.model_name!r}) or omit it; "
            f"add {model!r} to the mixture instead",
            model_field,
        )
    return mixture


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else stop


def check_prompt_chars(services: Services, chars: int, field: str) -> None:
    """Refuse a prompt longer than `VBSERVE_MAX_PROMPT_CHARS` before any work on it."""
    limit = services.settings.max_prompt_chars
    if chars > limit:
        raise APIError("invalid_request", f"the prompt has {chars} characters; at most {limit} are accepted", field)


async def encode_prompt(services: Services, text: str, field: str) -> list[int]:
    """A plain prompt's token ids, tokenized off the event loop (`field` names the prompt
    in the caller's dialect)."""
    check_prompt_chars(services, len(text), field)
    return await services.tokenizing.run(lambda tokenizer: tokenizer.encode(text))


def output_limit(services: Services, requested: int | None, prompt_len: int) -> int:
    """The request's own limit, else the server default capped by the context left, so an
    omitted limit never turns a prompt that fits into an error."""
    if requested is not None:
        return requested
    room = services.base_model.max_len - prompt_len
    return max(1, min(services.settings.default_max_tokens, room))


async def submit(services: Services, request: GenerationRequest, field_names: Mapping[str, str]) -> RequestHandle:
    """Queue the request; a refusal becomes an API error that names the field as the
    caller's dialect spells it (`field_names` maps engine names to those)."""
    return (await submit_n(services, request, 1, field_names))[0]


async def submit_n(
    services: Services, request: GenerationRequest, n: int, field_names: Mapping[str, str]
) -> list[RequestHandle]:
    """`submit` for `n` independent samples of the request (`Engine.submit_n`)."""
    try:
        return await services.engine.submit_n(request, n)
    except EngineError as exc:
        raise from_engine_error(exc, field_names) from None


async def run_all(
    services: Services, http_request: Request, handles: list[RequestHandle], field_names: Mapping[str, str]
) -> list[Outcome]:
    """Wait for every handle's whole generation. A client that hangs up meanwhile cancels
    them, so an abandoned request stops taking batch rows; so does one of them failing
    (the response is that failure)."""
    tokens: list[list[TokenEvent]] = [[] for _ in handles]
    results: list[FinalResult | None] = [None] * len(handles)
    watcher = asyncio.create_task(_cancel_on_disconnect(http_request, handles))
    try:
        async for i, event in _tagged(handles):
            if isinstance(event, FinalResult):
                results[i] = event
                if event.error is not None:
                    _cancel(handles)
            else:
                tokens[i].append(event)
    finally:
        watcher.cancel()
        if None in results:  # this handler was cancelled: stop the engine work too
            _cancel(handles)
    _observe(services, results, field_names)
    return [Outcome(result, events) for result, events in zip(results, tokens, strict=True)]


async def open_stream(
    services: Services, http_request: Request, handle: RequestHandle, field_names: Mapping[str, str]
) -> AsyncIterator[Event]:
    """Token events then the FinalResult, as an async iterator (see `open_streams`)."""
    events = await open_streams(services, http_request, [handle], field_names)

    async def untagged() -> AsyncIterator[Event]:
        async for _, event in events:
            yield event

    return untagged()


async def open_streams(
    services: Services, http_request: Request, handles: list[RequestHandle], field_names: Mapping[str, str]
) -> AsyncIterator[tuple[int, Event]]:
    """Every handle's token events then its FinalResult, tagged with the handle's index, as
    one async iterator that ends when all have finished.

    Each handle's first event is awaited here, before any response byte is sent: a
    generation that fails before its first token (its adapter failed to load) still gets a
    proper error status. Later failures arrive as a FinalResult with `error` set, for the
    dialect to send as an error event. A client that hangs up cancels the engine requests:
    seen by a watcher from now on (also while waiting for the first tokens, or if the
    response is dropped before it starts streaming), and by the iterator being closed early."""
    watcher = asyncio.create_task(_cancel_on_disconnect(http_request, handles))
    events = _tagged(handles)
    first: list[tuple[int, Event]] = []
    try:
        while len({i for i, _ in first}) < len(handles):
            first.append(await anext(events))
    except BaseException:
        watcher.cancel()
        _cancel(handles)
        raise
    finals = [event for _, event in first if isinstance(event, FinalResult)]
    failed = any(f.error is not None for f in finals)
    if failed or len(finals) == len(handles):
        watcher.cancel()
    if failed:
        _cancel(handles)  # the response is this failure: the others stop too
    _observe(services, finals, field_names)

    async def stream() -> AsyncIterator[tuple[int, Event]]:
        finished = len(finals)
        try:
            for tagged in first:
                yield tagged
            if finished == len(handles):
                return
            async for i, event in events:
                if isinstance(event, FinalResult):
                    finished += 1
                    services.metrics.observe_result(event)
                yield i, event
        finally:
            watcher.cancel()
            if finished < len(handles):
                _cancel(handles)
                services.metrics.observe_abandoned()

    return stream()


async def _tagged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Event]]:
    """The handles' events as (index, event) in the order they arrive, until every handle
    has sent its FinalResult."""
    if len(handles) == 1:  # no merging to do
        async for event in handles[0]:
            yield 0, event
        return
    merged: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def forward(i: int, handle: RequestHandle) -> None:
        async for event in handle:
            merged.put_nowait((i, event))

    forwarders = [asyncio.create_task(forward(i, handle)) for i, handle in enumerate(handles)]
    try:
        finished = 0
        while finished < len(handles):
            i, event = await merged.get()
            finished += isinstance(event, FinalResult)
            yield i, event
    finally:
        for task in forwarders:
            task.cancel()


def _cancel(handles: list[RequestHandle]) -> None:
    for handle in handles:
        handle.cancel()


def sse_response(events: AsyncIterator[bytes]) -> EventSourceResponse:
    """A stream of `sse` events, with FastAPI's SSE media type and its no-cache and
    no-proxy-buffering headers.

    FastAPI's own SSE path (a generator path operation with
    `response_class=EventSourceResponse`) is not used, for two reasons. It sends the 200
    without waiting for the generator's first event, and a generation must still answer
    an error status until its first event (`open_streams`: an adapter that fails to load).
    And the job event stream shares its URL with the JSON list, chosen by `?stream` and
    `Accept`, while FastAPI makes a generator path operation SSE for every request. What
    FastAPI adds besides, a keep-alive comment when idle, `routers.jobs.follow` sends itself."""
    return EventSourceResponse(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(data: BaseModel | dict | str) -> bytes:
    """One server-sent event: `data: <payload>` and a blank line, the payload a model's or
    dict's compact JSON or a string as it is (OpenAI's `[DONE]`)."""
    if isinstance(data, BaseModel):
        payload = data.model_dump_json()
    elif isinstance(data, dict):
        payload = json.dumps(data, separators=(",", ":"))
    else:
        payload = data
    return format_sse_event(data_str=payload)


def error_event(error: EngineError, field_names: Mapping[str, str]) -> bytes:
    """A failure after streaming began: the status line is gone, so the error travels as
    an event with the usual error body (OpenAI's client raises on it)."""
    return sse(from_engine_error(error, field_names).body())


def _observe(services: Services, results: list[FinalResult], field_names: Mapping[str, str]) -> None:
    """Count the results in the metrics, then raise the first one's error, if any failed."""
    for result in results:
        services.metrics.observe_result(result)
    for result in results:
        if result.error is not None:
            raise from_engine_error(result.error, field_names)


async def _cancel_on_disconnect(request: Request, handles: list[RequestHandle]) -> None:
    # The body has been read, so the next ASGI message is the disconnect (or nothing,
    # until the response is complete and this task is cancelled).
    while (await request.receive())["type"] != "http.disconnect":
        pass
    _cancel(handles)
