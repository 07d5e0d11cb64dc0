"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

`model` selects the adapter: one of the tenant's adapter names, or the base model's name
(or nothing) for the base model alone; `adapters` (extra body) asks for a mixture instead.
Routes only translate; `generation` runs them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from vbserve.engine import FinalResult, GenerationRequest, SamplingParams, TokenEvent

from .. import tool_calls
from ..adapter_io import iter_records
from ..body_limits import BodyLimitedRoute
from ..deps import GenerationsDep, Services, ServicesDep, TenantDep
from ..errors import APIError
from ..generation import (
    Event,
    check_prompt_chars,
    encode_prompt,
    error_event,
    open_streams,
    output_limit,
    request_adapter,
    run_all,
    sse,
    sse_response,
    stop_list,
    submit_n,
)
from ..schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FunctionCall,
    FunctionDelta,
    ModelCard,
    ModelList,
    SamplingFields,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    UsageInfo,
)
from ..tool_calls import CallDelta, Piece, Reader

router = APIRouter(prefix="/v1", tags=["openai"], route_class=BodyLimitedRoute)

# Engine field names -> the names an OpenAI caller used.
COMPLETION_FIELDS = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs"}
CHAT_FIELDS = {"max_new_tokens": "max_tokens", "prompt": "messages"}


@router.post("/completions", response_model=CompletionResponse)
async def completions(
    body: CompletionRequest, request: Request, services: ServicesDep, tenant: TenantDep, generations: GenerationsDep
) -> CompletionResponse | StreamingResponse:
    generations.hold(body.n, "n")
    prompt = _single_prompt(body.prompt)
    if body.echo and body.logprobs is not None:
        # OpenAI would score the prompt's tokens too: the engine keeps only the last position's logits.
        raise APIError("invalid_request", "echo with logprobs (the prompt tokens' logprobs) is not supported", "echo")
    ids = await encode_prompt(services, prompt, "prompt")
    logprobs = body.logprobs is not None
    sampling = _sampling(services, body, len(ids), body.max_tokens, logprobs, body.logprobs or 0)
    engine_request = GenerationRequest(
        ids,
        sampling,
        request_adapter(services, tenant, body.model, "model", body.mixture(tenant)),
        response_format=body.output_format(),
    )
    handles = await submit_n(services, engine_request, body.n, COMPLETION_FIELDS)
    meta = _Meta(f"cmpl-{engine_request.request_id}", body.model or services.model_name, services.tokenizer)
    echo = prompt if body.echo else ""
    if body.stream:
        events = await open_streams(services, request, handles, COMPLETION_FIELDS)
        return sse_response(_completion_chunks(meta, events, len(handles), echo, logprobs, _include_usage(body)))
    outcomes = await run_all(services, request, handles, COMPLETION_FIELDS)
    choices = [
        CompletionChoice(
            index=i,
            text=echo + outcome.result.text,
            finish_reason=outcome.result.finish_reason,
            logprobs=_completion_logprobs(meta.token_text, outcome.tokens) if logprobs else None,
        )
        for i, outcome in enumerate(outcomes)
    ]
    return CompletionResponse(
        id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=_usage(o.result for o in outcomes)
    )


@router.post("/chat/completions", response_model=ChatResponse)
async def chat_completions(
    body: ChatRequest, request: Request, services: ServicesDep, tenant: TenantDep, generations: GenerationsDep
) -> ChatResponse | StreamingResponse:
    generations.hold(body.n, "n")
    tools = tool_calls.plan(services.chat_template, body)
    _check_chat_size(services, body.messages, tools.tools)
    # Every tool's parameters must be a usable schema, within response_format's bounds, even
    # when nothing constrains the output to it (compiled grammars are cached by schema).
    await services.engine.grammars.compile_all(tools.parameters, "tools")
    ids = await services.tokenizing.run(lambda tokenizer: _chat_prompt_ids(tokenizer, body, tools.tools))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = _sampling(services, body, len(ids), max_tokens, body.logprobs, body.top_logprobs or 0)
    engine_request = GenerationRequest(
        ids,
        sampling,
        request_adapter(services, tenant, body.model, "model", body.mixture(tenant)),
        response_format=tools.response_format or body.output_format(),
    )
    handles = await submit_n(services, engine_request, body.n, CHAT_FIELDS)
    meta = _Meta(f"chatcmpl-{engine_request.request_id}", body.model or services.model_name, services.tokenizer)
    if body.stream:
        events = await open_streams(services, request, handles, CHAT_FIELDS)
        return sse_response(
            _chat_chunks(meta, events, len(handles), body.logprobs, _include_usage(body), tools.new_reader)
        )
    outcomes = await run_all(services, request, handles, CHAT_FIELDS)
    choices = []
    for i, outcome in enumerate(outcomes):
        reader = tools.new_reader()
        choices.append(
            ChatChoice(
                index=i,
                message=_assistant_message(reader.feed(outcome.result.text) + reader.end()),
                finish_reason=_chat_finish_reason(reader, outcome.result),
                logprobs=_chat_logprobs(meta.token_text, outcome.tokens) if body.logprobs else None,
            )
        )
    return ChatResponse(
        id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=_usage(o.result for o in outcomes)
    )


@router.get("/models", response_model=ModelList)
def models(services: ServicesDep, tenant: TenantDep) -> ModelList:
    """The base model, then every adapter of the tenant (each runs on that base model)."""
    base = services.model_name
    cards = [ModelCard(id=base, created=int(services.started), owned_by="vbserve")]
    cards += [
        ModelCard(id=r.name, created=int(r.created), owned_by=tenant, parent=base)
        for r in iter_records(services.store, tenant)
    ]
    return ModelList(data=cards)


# -- request translation -------------------------------------------------------------------


def _single_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) != 1:
        raise APIError("invalid_request", "exactly one prompt per request is supported", "prompt")
    return prompt[0]


def _check_chat_size(services: Services, messages: list[ChatMessage], tools: list[dict] | None) -> None:
    limit = services.settings.max_chat_messages
    if len(messages) > limit:
        raise APIError("invalid_request", f"{len(messages)} messages; at most {limit} are accepted", "messages")
    chars = sum(len(m.text) + sum(len(c.function.arguments) for c in m.tool_calls or []) for m in messages)
    check_prompt_chars(services, chars + len(json.dumps(tools)) if tools else chars, "messages")


def _chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, body: ChatRequest, tools: list[dict] | None = None
) -> list[int]:
    """Render the conversation (and the tools, for a template that takes them) with the
    model's own chat template, ending in the assistant's turn. The template writes any
    special tokens itself. Runs in a tokenizing thread, in time linear in the
    conversation's length."""
    if not tokenizer.chat_template:
        raise APIError("invalid_request", "the base model has no chat template; use /v1/completions", "messages")
    conversation = [tool_calls.template_message(m) for m in body.messages]
    specials = _special_token_strings(tokenizer)
    _refuse_control_tokens(specials, tools, conversation)
    if not any(s in m["content"] for m in conversation for s in specials):
        return tokenizer.encode(_render(tokenizer, conversation, tools), add_special_tokens=False)
    # A message spells one of the model's control tokens ("<|im_end|>"). Encoding the
    # rendered text as a whole would read it as that token, so a user could close their
    # turn and open a system turn of their own. Render with placeholders instead, encode
    # the template's text as usual and every message's content as plain text.
    marked = [i for i, m in enumerate(conversation) if m["content"]]
    placeholders = [{**m, "content": f"\ue000{i}\ue001"} if m["content"] else m for i, m in enumerate(conversation)]
    text = _render(tokenizer, placeholders, tools)
    matches = list(_MARK.finditer(text))
    # One pass over the text, not one per message (that was quadratic: 8000 messages, 2.3 s).
    if sorted(int(m.group(1)) for m in matches) != marked:
        # A template that drops or repeats content.
        raise APIError("invalid_request", "messages may not contain the model's control tokens", "messages")
    ids: list[int] = []
    pos = 0
    for match in matches:
        ids += tokenizer.encode(text[pos : match.start()], add_special_tokens=False)
        content = conversation[int(match.group(1))]["content"]
        ids += tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True)
        pos = match.end()
    return ids + tokenizer.encode(text[pos:], add_special_tokens=False)


_MARK = re.compile("\ue000(\\d+)\ue001")


def _refuse_control_tokens(specials: list[str], tools: list[dict] | None, conversation: list[dict[str, Any]]) -> None:
    """Tools and tool calls are rendered as JSON inside the template's text, where no
    placeholder can stand in for them: a control token in them is refused."""

    def spells_one(value: object) -> bool:
        text = json.dumps(value, ensure_ascii=False)
        return any(s in text for s in specials)

    if tools and spells_one(tools):
        raise APIError("invalid_request", "tools may not contain the model's control tokens", "tools")
    for i, m in enumerate(conversation):
        for key in ("tool_calls", "tool_call_id"):
            if key in m and spells_one(m[key]):
                raise APIError("invalid_request", "may not contain the model's control tokens", f"messages.{i}.{key}")


def _render(tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, Any]], tools: list[dict] | None) -> str:
    try:
        return tokenizer.apply_chat_template(conversation, tools=tools, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:
        raise APIError("invalid_request", f"the chat template refused the messages: {exc}", "messages") from None


def _special_token_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return [t.content for t in added.values() if t.special] + list(tokenizer.all_special_tokens)


def _sampling(
    services: Services, body: SamplingFields, prompt_len: int, max_tokens: int | None, logprobs: bool, top: int
) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=output_limit(services, max_tokens, prompt_len),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed,
        stop=stop_list(body.stop),
        stop_token_ids=body.stop_token_ids or [],
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=body.logit_bias or {},
        min_p=body.min_p or 0.0,
        min_tokens=body.min_tokens or 0,
    )


def _include_usage(body: SamplingFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


# -- response translation ------------------------------------------------------------------


class _Meta:
    """What every chunk of one response repeats."""

    def __init__(self, id: str, model: str, tokenizer: PreTrainedTokenizerBase) -> None:
        self.id = id
        self.model = model
        self.created = int(time.time())
        self.token_text: Callable[[int], str] = lambda token_id: tokenizer.decode([token_id])


def _usage(results: Iterable[FinalResult]) -> UsageInfo:
    """One request's usage, over all its choices: the prompt once (as OpenAI counts it),
    the completions' tokens summed."""
    usages = [r.usage for r in results]
    prompt, completion = usages[0].prompt_tokens, sum(u.completion_tokens for u in usages)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _scored(tokens: list[TokenEvent]) -> list[TokenEvent]:
    # Events with token_id -1 carry only text the detokenizer held back, no token.
    return [t for t in tokens if t.token_id >= 0 and t.logprob is not None]


def _completion_logprobs(token_text: Callable[[int], str], tokens: list[TokenEvent]) -> CompletionLogprobs:
    scored = _scored(tokens)
    return CompletionLogprobs(
        tokens=[token_text(t.token_id) for t in scored],
        token_logprobs=[t.logprob for t in scored],
        top_logprobs=[{token_text(i): lp for i, lp in (t.top_logprobs or {}).items()} for t in scored],
    )


def _chat_logprobs(token_text: Callable[[int], str], tokens: list[TokenEvent]) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return ChatLogprobs(
        content=[
            TokenLogprob(
                **entry(t.token_id, t.logprob).model_dump(),
                top_logprobs=[entry(i, lp) for i, lp in (t.top_logprobs or {}).items()],
            )
            for t in _scored(tokens)
        ]
    )


async def _completion_chunks(
    meta: _Meta, events: AsyncIterator[tuple[int, Event]], n: int, echo: str, logprobs: bool, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(index: int, text: str, finish_reason: str | None = None, tokens: list[TokenEvent] | None = None) -> bytes:
        lp = _completion_logprobs(meta.token_text, tokens) if logprobs and tokens else None
        choice = CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=lp)
        return sse(CompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=[choice]))

    if echo:
        for index in range(n):
            yield chunk(index, echo)
    finals: list[FinalResult] = []
    async for index, event in events:
        if isinstance(event, TokenEvent):
            if event.text or (logprobs and event.logprob is not None):
                yield chunk(index, event.text, tokens=[event])
            continue
        if event.error is not None:
            yield error_event(event.error, COMPLETION_FIELDS)
            return
        finals.append(event)
        yield chunk(index, "", event.finish_reason)
    if include_usage:
        yield sse(
            CompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=_usage(finals))
        )
    yield sse("[DONE]")


def _assistant_message(pieces: list[Piece]) -> AssistantMessage:
    """A whole choice's message from its reader's pieces."""
    content = "".join(p for p in pieces if isinstance(p, str))
    calls: list[ToolCall] = []
    for p in pieces:
        if isinstance(p, CallDelta):
            if p.id is not None:  # a call's first piece
                calls.append(ToolCall(id=p.id, function=FunctionCall(name=p.name or "", arguments="")))
            calls[p.index].function.arguments += p.arguments
    if not calls:
        return AssistantMessage(content=content)
    # OpenAI: content is null when the answer is only tool calls.
    return AssistantMessage(content=content if content.strip() else None, tool_calls=calls)


def _chat_delta(piece: Piece) -> ChatDelta:
    if isinstance(piece, str):
        return ChatDelta(content=piece)
    function = FunctionDelta(name=piece.name, arguments=piece.arguments)
    call = ToolCallDelta(index=piece.index, id=piece.id, type="function" if piece.id else None, function=function)
    return ChatDelta(tool_calls=[call])


def _chat_finish_reason(reader: Reader, result: FinalResult) -> str | None:
    return "tool_calls" if reader.calls and result.finish_reason == "stop" else result.finish_reason


async def _chat_chunks(
    meta: _Meta,
    events: AsyncIterator[tuple[int, Event]],
    n: int,
    logprobs: bool,
    include_usage: bool,
    new_reader: Callable[[], Reader],
) -> AsyncIterator[bytes]:
    def chunk(
        index: int, delta: ChatDelta, finish_reason: str | None = None, tokens: list[TokenEvent] | None = None
    ) -> bytes:
        lp = _chat_logprobs(meta.token_text, tokens) if logprobs and tokens else None
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=lp)
        return sse(ChatChunk(id=meta.id, created=meta.created, model=meta.model, choices=[choice]))

    readers = [new_reader() for _ in range(n)]
    # OpenAI opens every choice's stream with the role, before any content.
    for index in range(n):
        yield chunk(index, ChatDelta(role="assistant", content=""))
    finals: list[FinalResult] = []
    async for index, event in events:
        if isinstance(event, TokenEvent):
            pieces = readers[index].feed(event.text)
            if not pieces and logprobs and event.logprob is not None:
                yield chunk(index, ChatDelta(), tokens=[event])
            for i, piece in enumerate(pieces):  # the token's logprobs ride on its first piece
                yield chunk(index, _chat_delta(piece), tokens=None if i else [event])
            continue
        if event.error is not None:
            yield error_event(event.error, CHAT_FIELDS)
            return
        finals.append(event)
        for piece in readers[index].end():
            yield chunk(index, _chat_delta(piece))
        yield chunk(index, ChatDelta(), _chat_finish_reason(readers[index], event))
    if include_usage:
        yield sse(ChatChunk(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=_usage(finals)))
    yield sse("[DONE]")
