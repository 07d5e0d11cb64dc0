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
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.engine import AdapterRef, EngineError, FinalResult, GenerationRequest, RequestHandle, TokenEvent

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
    room = services.engine.runner.max_len - prompt_len
    return max(1, min(services.settings.default_max_tokens, room))


async def submit(services: Services, request: GenerationRequest, field_names: Mapping[str, str]) -> RequestHandle:
    """Queue the request; a refusal becomes an API error that names the field as the
    caller's dialect spells it (`field_names` maps engine names to those)."""
    try:
        return await services.engine.submit(request)
    except EngineError as exc:
        raise from_engine_error(exc, field_names) from None


async def run_to_end(
    services: Services, http_request: Request, handle: RequestHandle, field_names: Mapping[str, str]
) -> Outcome:
    """Wait for the whole generation. A client that hangs up meanwhile cancels it, so an
    abandoned request stops taking a batch row."""
    tokens: list[TokenEvent] = []
    result: FinalResult | None = None
    watcher = asyncio.create_task(_cancel_on_disconnect(http_request, handle))
    try:
        async for event in handle:
            if isinstance(event, FinalResult):
                result = event
            else:
                tokens.append(event)
    finally:
        watcher.cancel()
        if result is None:  # this handler was cancelled: stop the engine work too
            handle.cancel()
    _observe(services, result, field_names)
    return Outcome(result, tokens)


async def open_stream(
    services: Services, http_request: Request, handle: RequestHandle, field_names: Mapping[str, str]
) -> AsyncIterator[Event]:
    """Token events then the FinalResult, as an async iterator.

    The first event is awaited here, before any response byte is sent: a generation that
    fails before its first token (its adapter failed to load) still gets a proper error
    status. Later failures arrive as a FinalResult with `error` set, for the dialect to
    send as an error event. A client that hangs up cancels the engine request: seen by a
    watcher from now on (also while waiting for the first token, or if the response is
    dropped before it starts streaming), and by the iterator being closed early."""
    watcher = asyncio.create_task(_cancel_on_disconnect(http_request, handle))
    try:
        first = await anext(aiter(handle))
    except BaseException:
        watcher.cancel()
        handle.cancel()
        raise
    if isinstance(first, FinalResult):
        watcher.cancel()
        _observe(services, first, field_names)

    async def events() -> AsyncIterator[Event]:
        finished = isinstance(first, FinalResult)
        try:
            yield first
            if finished:
                return
            async for event in handle:
                if isinstance(event, FinalResult):
                    finished = True
                    services.metrics.observe_result(event)
                yield event
        finally:
            watcher.cancel()
            if not finished:
                handle.cancel()
                services.metrics.observe_abandoned()

    return events()


def sse_response(lines: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def sse(data: BaseModel | dict | str) -> str:
    """One server-sent event (`data: ...` and a blank line)."""
    if isinstance(data, BaseModel):
        payload = data.model_dump_json()
    elif isinstance(data, dict):
        payload = json.dumps(data, separators=(",", ":"))
    else:
        payload = data
    return f"data: {payload}\n\n"


def error_event(error: EngineError, field_names: Mapping[str, str]) -> str:
    """A failure after streaming began: the status line is gone, so the error travels as
    an event with the usual error body (OpenAI's client raises on it)."""
    return sse(from_engine_error(error, field_names).body())


def _observe(services: Services, result: FinalResult, field_names: Mapping[str, str]) -> None:
    services.metrics.observe_result(result)
    if result.error is not None:
        raise from_engine_error(result.error, field_names)


async def _cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
    # The body has been read, so the next ASGI message is the disconnect (or nothing,
    # until the response is complete and this task is cancelled).
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()
