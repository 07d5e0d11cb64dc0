"""LoRAX/TGI-compatible routes: `POST /generate`, `POST /generate_stream`, and `POST /`
(where LoRAX's and TGI's Python clients post; `stream` in the body picks which of the two).

`parameters.adapter_id` selects the adapter, `parameters.merged_adapters` a mixture. As in
TGI, decoding is greedy unless `do_sample` is true or a `temperature` is given. Every
parameter `lorax-client` sends is implemented or, set to anything but its default, refused
with a 400 naming it (`schemas.lorax.GenerateParameters`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import fields

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from vbserve.engine import FinalResult, GenerationRequest, SamplingParams, TokenEvent

from ..body_limits import BodyLimitedRoute
from ..deps import GenerationsDep, GenerationSlot, HeldGenerations, Services, ServicesDep, TenantDep
from ..errors import APIError, from_engine_error
from ..generation import (
    Event,
    encode_prompt,
    open_stream,
    output_limit,
    request_adapter,
    run_all,
    sse,
    sse_response,
    stop_list,
    submit,
    submit_n,
)
from ..schemas.lorax import (
    AlternativeToken,
    BestOfSequence,
    GenerateDetails,
    GeneratedToken,
    GenerateRequest,
    GenerateResponse,
    GenerateStreamEvent,
    StreamDetails,
)

router = APIRouter(tags=["lorax"], route_class=BodyLimitedRoute)

# Engine field names -> TGI's: sampling fields live under `parameters`, some renamed.
FIELDS = {f.name: f"parameters.{f.name}" for f in fields(SamplingParams)} | {
    "prompt": "inputs",
    "model": "parameters.adapter_id",
    "ignore_eos": "parameters.ignore_eos_token",
    "top_logprobs": "parameters.return_k_alternatives",
    "n": "parameters.best_of",
}


@router.post("/", response_model=list[GenerateResponse])
async def compat_generate(
    body: GenerateRequest, request: Request, services: ServicesDep, tenant: TenantDep, generations: GenerationsDep
) -> list[GenerateResponse] | StreamingResponse:
    """TGI's and LoRAX's compatibility route, where their Python clients post: `stream`
    in the body picks a stream of events as from /generate_stream, else a list of one
    response as from /generate."""
    if body.stream:
        return await _stream(services, request, tenant, body)
    return [await _generate(services, request, tenant, body, generations)]


@router.post("/generate", response_model=GenerateResponse)
async def generate(
    body: GenerateRequest, request: Request, services: ServicesDep, tenant: TenantDep, generations: GenerationsDep
) -> GenerateResponse:
    _check_stream_matches(body, streaming=False)
    return await _generate(services, request, tenant, body, generations)


@router.post("/generate_stream", dependencies=[GenerationSlot])
async def generate_stream(
    body: GenerateRequest, request: Request, services: ServicesDep, tenant: TenantDep
) -> StreamingResponse:
    _check_stream_matches(body, streaming=True)
    return await _stream(services, request, tenant, body)


def _check_stream_matches(body: GenerateRequest, streaming: bool) -> None:
    if body.stream is not None and body.stream != streaming:
        route = "/generate_stream" if streaming else "/generate"
        raise APIError("invalid_request", f"stream={body.stream} contradicts {route}; POST / picks by stream", "stream")


async def _generate(
    services: Services, request: Request, tenant: str, body: GenerateRequest, generations: HeldGenerations
) -> GenerateResponse:
    p = body.parameters
    best_of = p.samples
    generations.hold(best_of, "parameters.best_of")  # each sample is a batch row
    engine_request = await _engine_request(services, tenant, body, streaming=False)
    handles = await submit_n(services, engine_request, best_of, FIELDS)
    outcomes = await run_all(services, request, handles, FIELDS)
    # TGI's pick: the sample whose generated tokens have the highest summed logprob.
    ranked = sorted(range(best_of), key=lambda i: -sum(t.logprob or 0.0 for t in outcomes[i].tokens))
    best = outcomes[ranked[0]].result
    details = None
    if p.details:
        token = _token_maker(services)

        def sequence(i: int) -> dict:
            result = outcomes[i].result
            return {
                "finish_reason": _finish_reason(services, result),
                "generated_tokens": result.usage.completion_tokens,
                "seed": None if p.seed is None else p.seed + i,  # sample i's seed (Engine.submit_n)
                "tokens": [token(t) for t in _merge_held_text(outcomes[i].tokens)],
            }

        others = [
            BestOfSequence(generated_text=_full_text(body, outcomes[i].result.text), **sequence(i)) for i in ranked[1:]
        ]
        details = GenerateDetails(
            prompt_tokens=best.usage.prompt_tokens, best_of_sequences=others or None, **sequence(ranked[0])
        )
    return GenerateResponse(generated_text=_full_text(body, best.text), details=details)


async def _stream(services: Services, request: Request, tenant: str, body: GenerateRequest) -> StreamingResponse:
    engine_request = await _engine_request(services, tenant, body, streaming=True)
    handle = await submit(services, engine_request, FIELDS)
    events = await open_stream(services, request, handle, FIELDS)
    return sse_response(_stream_events(services, body, events))


async def _engine_request(services: Services, tenant: str, body: GenerateRequest, streaming: bool) -> GenerationRequest:
    p = body.parameters
    ids = await encode_prompt(services, body.inputs, "inputs")
    if p.truncate is not None:
        if p.truncate < 1:
            raise APIError("invalid_request", f"must be at least 1, got {p.truncate}", "parameters.truncate")
        ids = ids[-p.truncate :]  # as TGI: the prompt's last tokens are kept
    sampled = p.do_sample or p.temperature is not None
    best_of = p.samples
    if best_of != 1 and (streaming or not sampled):
        # As TGI: greedy samples would all be the same, and a stream cannot pick its best.
        raise APIError(
            "invalid_request", "best_of above 1 needs do_sample (or a temperature), not streamed", "parameters.best_of"
        )
    sampling = SamplingParams(
        max_new_tokens=output_limit(services, p.max_new_tokens, len(ids)),
        temperature=(1.0 if p.temperature is None else p.temperature) if sampled else 0.0,
        top_p=1.0 if p.top_p is None else p.top_p,
        top_k=p.top_k or 0,
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        seed=p.seed,
        stop=stop_list(p.stop),
        ignore_eos=p.ignore_eos_token,
        # Every streamed TGI token carries its logprob, with details or without
        # (lorax-client's `Token.logprob` is required). Not asked for otherwise: a batch
        # with one row that wants logprobs computes them for every row (7.9 ms a step at
        # 32 rows of SmolLM2's 49,152-token vocabulary, measured on 2 CPU cores).
        # best_of ranks its samples by their summed logprob.
        logprobs=streaming or p.details or best_of > 1,
        top_logprobs=p.return_k_alternatives or 0,
    )
    response_format = p.response_format.output_format() if p.response_format else None
    mixture = p.merged_adapters.mixture(tenant) if p.merged_adapters else None
    adapter = request_adapter(services, tenant, p.adapter_id, "parameters.adapter_id", mixture)
    return GenerationRequest(ids, sampling, adapter, response_format=response_format)


def _full_text(body: GenerateRequest, generated: str) -> str:
    return body.inputs + generated if body.parameters.return_full_text else generated


def _finish_reason(services: Services, result: FinalResult) -> str:
    if result.finish_reason == "stop":
        ended_on_eos = bool(result.token_ids) and result.token_ids[-1] in services.base_model.eos_ids
        return "eos_token" if ended_on_eos else "stop_sequence"
    return "length"  # also a timeout: TGI has no other reason for a cut-short generation


def _token_maker(services: Services) -> Callable[[TokenEvent], GeneratedToken]:
    eos = services.base_model.eos_ids
    tokenizer = services.tokenizer

    def token(event: TokenEvent) -> GeneratedToken:
        alternatives = None
        if event.top_logprobs is not None:  # asked for by return_k_alternatives
            alternatives = [
                AlternativeToken(id=i, text=tokenizer.decode([i]), logprob=lp) for i, lp in event.top_logprobs.items()
            ]
        return GeneratedToken(
            id=event.token_id,
            text=event.text,
            logprob=event.logprob,
            special=event.token_id in eos,
            alternative_tokens=alternatives,
        )

    return token


def _merge_held_text(tokens: list[TokenEvent]) -> list[TokenEvent]:
    """TGI streams one event per token. Our detokenizer may release held-back text at the
    end as a token-less event (token_id -1); fold that text into the token before it, so
    the tokens' texts still add up to `generated_text`."""
    merged: list[TokenEvent] = []
    for t in tokens:
        if t.token_id < 0 and merged:
            last = merged[-1]
            merged[-1] = TokenEvent(last.index, last.token_id, last.text + t.text, last.logprob, last.top_logprobs)
        elif t.token_id >= 0:
            merged.append(t)
    return merged


async def _stream_events(
    services: Services, body: GenerateRequest, events: AsyncIterator[Event]
) -> AsyncIterator[bytes]:
    """Each token is sent when the next event arrives: the last token's event must carry
    `generated_text` and `details`, and whether a token is the last is known only then."""
    token = _token_maker(services)
    held: TokenEvent | None = None
    async for event in events:
        if isinstance(event, TokenEvent):
            if event.token_id < 0 and held is not None:
                held = _merge_held_text([held, event])[0]
                continue
            if held is not None:
                yield sse(GenerateStreamEvent(token=token(held)))
            held = event
            continue
        if event.error is not None:
            # TGI's `error_type` beside our error body: lorax-client raises its GenerationError.
            yield sse({**from_engine_error(event.error, FIELDS).body(), "error_type": "generation"})
            return
        if held is None:  # cancelled or timed out before the first token: nothing to report
            return
        details = StreamDetails(
            finish_reason=_finish_reason(services, event),
            generated_tokens=event.usage.completion_tokens,
            prompt_tokens=event.usage.prompt_tokens,
            seed=body.parameters.seed,
        )
        yield sse(GenerateStreamEvent(token=token(held), generated_text=_full_text(body, event.text), details=details))
