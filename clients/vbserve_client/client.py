"""Python client for a vbserve server, on httpx alone (no torch, nothing of the server).

    from vbserve_client import VBServeClient

    with VBServeClient("http://127.0.0.1:8000") as vb:
        vb.adapters.push("support-bot", "checkpoints/support-bot")  # a PEFT VB-LoRA dir
        print(vb.generate("Hello", adapter="support-bot", max_tokens=32).text)
        for delta in vb.stream("Tell me a story", adapter="support-bot"):
            print(delta, end="", flush=True)

        job = vb.jobs.create("train.jsonl", "support-bot-2", max_steps=200)
        for update in vb.jobs.follow(job.id):  # progress events, then the ended job
            print(update)

`AsyncVBServeClient` has the same methods as coroutines and async iterators. Errors are
raised as the `APIError` subclass that the server's error `type` names. The API key is
`api_key=`, else $VBSERVE_API_KEY; a server without authentication needs none.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import httpx
from httpx_sse import ServerSentEvent, SSEError, aconnect_sse, connect_sse

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "VBSERVE_API_KEY"
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a long generation is not a hung server
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")

ExportFormat = Literal["native", "peft", "lora"]

# -- errors ------------------------------------------------------------------------------


class APIError(Exception):
    """An error the server answered with (or, for `APIConnectionError`, no answer).

    type:    the server's error type (`not_found`, `invalid_request`, ...)
    field:   the request field at fault, when the server names one
    status:  the HTTP status (None when no response came)
    """

    def __init__(self, message: str, *, type: str = "error", field: str | None = None, status: int | None = None):
        super().__init__(message if field is None else f"{field}: {message}")
        self.message = message
        self.type = type
        self.field = field
        self.status = status


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke."""


class InvalidRequestError(APIError):
    """The request was refused as it stands (400/422): fix it before retrying."""


class IncompatibleAdapterError(InvalidRequestError):
    """The adapter does not fit the server's base model."""


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    """The adapter changed meanwhile (or the name is taken by the base model)."""


class TooLargeError(APIError):
    pass


class AuthenticationError(APIError):
    """401: the API key is missing, malformed, unknown or revoked."""


class PermissionDeniedError(APIError):
    """403: the key is valid but may not do this (e.g. the admin key on a tenant route)."""


class OverloadedError(APIError):
    """The server's queue (or the tenant's job limit) is full; retry after `retry_after` seconds."""

    retry_after: float | None = None


class RateLimitedError(APIError):
    """The tenant sent more requests, or ran more generations at once, than its limit;
    retry after `retry_after` seconds."""

    retry_after: float | None = None


class QuotaExceededError(APIError):
    """429: the tenant's adapter quota (count or bytes) is full. Retrying will not help;
    delete adapters or ask for a larger quota."""


class UnavailableError(APIError):
    """The server or its store is down or starting; retry after `retry_after` seconds."""

    retry_after: float | None = None


class InternalServerError(APIError):
    pass


_BY_TYPE: dict[str, type[APIError]] = {
    "invalid_request": InvalidRequestError,
    "unsupported_media_type": InvalidRequestError,
    "method_not_allowed": InvalidRequestError,
    "incompatible_adapter": IncompatibleAdapterError,
    "unauthorized": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "too_large": TooLargeError,
    "overloaded": OverloadedError,
    "rate_limited": RateLimitedError,
    "quota_exceeded": QuotaExceededError,
    "unavailable": UnavailableError,
    "internal_error": InternalServerError,
}
_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: TooLargeError,
    422: InvalidRequestError,
    429: OverloadedError,
    503: UnavailableError,
}


def error_from_body(body: Any, status: int | None, headers: httpx.Headers | None = None) -> APIError:
    """The typed exception for an error body `{"error": {"type", "message", "field"}}`."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(body) or f"HTTP {status}"}
    kind = err.get("type") or "error"
    cls = (
        _BY_TYPE.get(kind) or _BY_STATUS.get(status or 0) or (InternalServerError if (status or 0) >= 500 else APIError)
    )
    exc = cls(str(err.get("message", "")), type=kind, field=err.get("field"), status=status)
    retry_after = headers.get("retry-after") if headers is not None else None
    if isinstance(exc, OverloadedError | RateLimitedError | UnavailableError) and retry_after:
        exc.retry_after = float(retry_after)
    return exc


def _raise_for_status(response: httpx.Response) -> None:
    """Call after the body was read."""
    if response.is_success or response.status_code == 304:
        return
    try:
        body = response.json()
    except ValueError:
        body = response.text
    raise error_from_body(body, response.status_code, response.headers)


# -- results -----------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    model: str
    usage: Usage


@dataclass
class AdapterInfo:
    name: str
    version: int
    bank_id: str
    config: dict[str, Any]
    body_bytes: int
    bank_bytes: int
    stored_bytes: int
    created: float
    updated: float


@dataclass
class AdapterPage:
    data: list[AdapterInfo]
    has_more: bool
    next_after: str | None


@dataclass
class Model:
    id: str
    owned_by: str
    parent: str | None = None


@dataclass
class JobProgress:
    step: int  # optimizer steps done (0 until a worker starts)
    total_steps: int
    loss: float | None
    val_loss: float | None  # the last validation loss measured
    tokens_per_s: float | None


@dataclass
class FineTuningJob:
    id: str
    status: str  # queued, running, succeeded, failed or cancelled
    adapter: str  # the adapter the job publishes
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None  # the adapter name once the job succeeded
    adapter_version: int | None  # the version it published
    hyperparameters: dict[str, Any]
    progress: JobProgress
    error: str | None  # why it failed
    attempts: int
    cancel_requested: bool

    @property
    def ended(self) -> bool:
        return self.status in JOB_END_STATES


@dataclass
class JobEvent:
    """One progress report of a running job."""

    created_at: float
    step: int
    total_steps: int
    loss: float
    val_loss: float | None  # set on the steps that ran validation
    tokens_per_s: float
    val_exact_match: float | None = None  # on validation steps of a job with eval_exact_match_rows
    best_step: int | None = None  # on validation steps: the checkpoint the job would publish now
    best_val_loss: float | None = None
    # A fit_lora job's last event (its `loss` is the fit error): the LoRA's effect on the
    # logits the fitted adapter misses, and the share of positions with the same top token.
    output_rel_error: float | None = None
    top1_agreement: float | None = None


@dataclass
class JobPage:
    data: list[FineTuningJob]  # newest first
    has_more: bool


JOB_END_STATES = ("succeeded", "failed", "cancelled")


class SamplingOptions(TypedDict, total=False):
    """Sampling settings; anything left out takes the server's default (for
    `temperature` that is 1.0, as in OpenAI; pass 0 for greedy decoding)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: str | list[str]
    repetition_penalty: float


# -- request building and response parsing, shared by both clients -----------------------


@dataclass
class _Call:
    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def _completion_call(prompt: str, adapter: str | None, stream: bool, options: SamplingOptions) -> _Call:
    body = {"prompt": prompt, "stream": stream, **options}
    if adapter:
        body["model"] = adapter
    return _Call("POST", "/v1/completions", {"json": body})


def _chat_call(messages: list[dict[str, str]], adapter: str | None, stream: bool, options: SamplingOptions) -> _Call:
    body = {"messages": messages, "stream": stream, **options}
    if adapter:
        body["model"] = adapter
    return _Call("POST", "/v1/chat/completions", {"json": body})


def _completion(body: dict[str, Any], chat: bool) -> Completion:
    choice = body["choices"][0]
    return Completion(
        text=choice["message"]["content"] if chat else choice["text"],
        finish_reason=choice.get("finish_reason"),
        model=body["model"],
        usage=Usage(**body["usage"]),
    )


def _event_chunk(event: ServerSentEvent) -> dict[str, Any] | None:
    """The JSON of one server-sent event; None for `data: [DONE]`, the stream's end.
    An error event (a failure after streaming began) is raised."""
    if event.data == "[DONE]":
        return None
    chunk = event.json()
    if chunk.keys() == {"error"}:  # an error body, not an object with an `error` field (a job)
        raise error_from_body(chunk, None)
    return chunk


def _not_an_event_stream(exc: SSEError, response: httpx.Response) -> APIError:
    """A success status whose body is not `text/event-stream` (e.g. a proxy's page)."""
    return APIError(str(exc), status=response.status_code)


def _delta(chunk: dict[str, Any], chat: bool) -> str:
    if not chunk.get("choices"):  # e.g. the usage chunk
        return ""
    choice = chunk["choices"][0]
    return ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""


def _push_call(name: str, source: bytes | str | os.PathLike[str], expected_version: int | None) -> _Call:
    """bytes or a file: our adapter blob; a directory: a PEFT VB-LoRA or LoRA checkpoint."""
    params = {} if expected_version is None else {"expected_version": expected_version}
    if isinstance(source, bytes | bytearray):
        return _Call("PUT", f"/v1/adapters/{name}", {"content": bytes(source), "params": params, "headers": _OCTETS})
    path = Path(source)
    if path.is_dir():
        missing = [f for f in PEFT_FILES if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a PEFT checkpoint: missing {', '.join(missing)}")
        files = [(f, (f, (path / f).read_bytes(), "application/octet-stream")) for f in PEFT_FILES]
        return _Call("PUT", f"/v1/adapters/{name}", {"files": files, "params": params})
    return _Call("PUT", f"/v1/adapters/{name}", {"content": path.read_bytes(), "params": params, "headers": _OCTETS})


_OCTETS = {"content-type": "application/octet-stream"}


def _pull_call(name: str, format: ExportFormat, omit_bank: bool) -> _Call:
    params: dict[str, Any] = {"format": format}
    if omit_bank:
        params["omit_bank"] = "true"
    return _Call("GET", f"/v1/adapters/{name}/content", {"params": params})


def _list_call(after: str | None, limit: int) -> _Call:
    params: dict[str, Any] = {"limit": limit}
    if after is not None:
        params["after"] = after
    return _Call("GET", "/v1/adapters", {"params": params})


def _page(body: dict[str, Any]) -> AdapterPage:
    return AdapterPage([AdapterInfo(**a) for a in body["data"]], body["has_more"], body.get("next_after"))


def _models(body: dict[str, Any]) -> list[Model]:
    return [Model(id=m["id"], owned_by=m.get("owned_by", ""), parent=m.get("parent")) for m in body["data"]]


def _auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


_JOBS = "/v1/fine_tuning/jobs"


def _list_jobs_call(limit: int, after: str | None) -> _Call:
    params: dict[str, int | str] = {"limit": limit}
    if after is not None:
        params["after"] = after
    return _Call("GET", _JOBS, {"params": params})


def _create_job_call(
    training_file: bytes | str | os.PathLike[str],
    adapter: str,
    validation_file: bytes | str | os.PathLike[str] | None,
    hyperparameters: dict[str, Any],
) -> _Call:
    files = {"training_file": _jsonl_part(training_file, "train.jsonl")}
    if validation_file is not None:
        files["validation_file"] = _jsonl_part(validation_file, "validation.jsonl")
    data = {"adapter": adapter}
    if hyperparameters:  # one JSON field keeps the types (a form field is always a string)
        data["hyperparameters"] = json.dumps(hyperparameters)
    return _Call("POST", _JOBS, {"data": data, "files": files})


def _jsonl_part(source: bytes | str | os.PathLike[str], default_name: str) -> tuple[str, bytes, str]:
    if isinstance(source, bytes | bytearray):
        return default_name, bytes(source), "application/jsonl"
    path = Path(source)
    return path.name, path.read_bytes(), "application/jsonl"


def _follow_call(job_id: str) -> _Call:
    return _Call("GET", f"{_JOBS}/{job_id}/events", {"params": {"stream": "true"}})


def _known_fields(cls: type, body: dict[str, Any]) -> dict[str, Any]:
    """The fields of dataclass `cls` from a response body (a newer server may send more)."""
    return {f.name: body.get(f.name) for f in fields(cls)}


def _job(body: dict[str, Any]) -> FineTuningJob:
    error = body.get("error")
    return FineTuningJob(
        **{
            **_known_fields(FineTuningJob, body),
            "progress": JobProgress(**_known_fields(JobProgress, body["progress"])),
            "error": error.get("message") if isinstance(error, dict) else None,
        }
    )


def _job_event(body: dict[str, Any]) -> JobEvent:
    return JobEvent(**_known_fields(JobEvent, body))


def _job_update(chunk: dict[str, Any]) -> JobEvent | FineTuningJob:
    """A followed job's SSE event: a progress event, or the job when its status changed."""
    return _job(chunk) if chunk.get("object") == "fine_tuning.job" else _job_event(chunk)


def _job_page(body: dict[str, Any]) -> JobPage:
    return JobPage([_job(j) for j in body["data"]], body["has_more"])


# -- the synchronous client --------------------------------------------------------------


class VBServeClient:
    """Blocking client. Use as a context manager, or call `close()`.

    api_key: sent as `Authorization: Bearer ...`; None reads $VBSERVE_API_KEY."""

    def __init__(
        self, url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT
    ) -> None:
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=_auth_headers(api_key))
        self.adapters = Adapters(self)
        self.jobs = Jobs(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VBServeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(self, prompt: str, *, adapter: str | None = None, **options: Unpack[SamplingOptions]) -> Completion:
        """Complete `prompt` (with `adapter`, or the base model when None)."""
        return _completion(self._json(_completion_call(prompt, adapter, False, options)), chat=False)

    def stream(self, prompt: str, *, adapter: str | None = None, **options: Unpack[SamplingOptions]) -> Iterator[str]:
        """Complete `prompt`, yielding text deltas as they are generated."""
        return self._deltas(_completion_call(prompt, adapter, True, options), chat=False)

    def chat(
        self, messages: list[dict[str, str]], *, adapter: str | None = None, **options: Unpack[SamplingOptions]
    ) -> Completion:
        """The assistant's reply to `messages` (`[{"role": "user", "content": "..."}]`)."""
        return _completion(self._json(_chat_call(messages, adapter, False, options)), chat=True)

    def chat_stream(
        self, messages: list[dict[str, str]], *, adapter: str | None = None, **options: Unpack[SamplingOptions]
    ) -> Iterator[str]:
        return self._deltas(_chat_call(messages, adapter, True, options), chat=True)

    def models(self) -> list[Model]:
        """The base model first, then the adapters."""
        return _models(self._json(_Call("GET", "/v1/models")))

    def _send(self, call: _Call) -> httpx.Response:
        try:
            response = self._http.request(call.method, call.path, **call.kwargs)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc
        _raise_for_status(response)
        return response

    def _json(self, call: _Call) -> Any:
        return self._send(call).json()

    def _sse(self, call: _Call) -> Iterator[dict[str, Any]]:
        """The JSON events of a server-sent event stream, until `data: [DONE]`."""
        try:
            with connect_sse(self._http, call.method, call.path, **call.kwargs) as source:
                if not source.response.is_success:
                    source.response.read()
                    _raise_for_status(source.response)
                try:
                    for event in source.iter_sse():
                        if (chunk := _event_chunk(event)) is None:
                            return
                        yield chunk
                except SSEError as exc:
                    raise _not_an_event_stream(exc, source.response) from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc

    def _deltas(self, call: _Call, chat: bool) -> Iterator[str]:
        for chunk in self._sse(call):
            if text := _delta(chunk, chat):
                yield text


class Adapters:
    """`client.adapters`: the tenant's adapters on the server."""

    def __init__(self, client: VBServeClient) -> None:
        self._client = client

    def push(
        self, name: str, source: bytes | str | os.PathLike[str], *, expected_version: int | None = None
    ) -> AdapterInfo:
        """Upload `source` as the next version of `name`: adapter blob bytes, a blob file,
        or a PEFT VB-LoRA checkpoint directory. `expected_version` makes the write
        conditional (0: only if `name` is new); a mismatch raises ConflictError."""
        return AdapterInfo(**self._client._json(_push_call(name, source, expected_version)))

    def pull(self, name: str, *, format: ExportFormat = "native", omit_bank: bool = False) -> bytes:
        """The adapter's bytes: our blob (native), or a zip of a PEFT VB-LoRA (peft) or
        plain LoRA (lora) checkpoint."""
        return self._client._send(_pull_call(name, format, omit_bank)).content

    def get(self, name: str) -> AdapterInfo:
        return AdapterInfo(**self._client._json(_Call("GET", f"/v1/adapters/{name}")))

    def list(self, *, after: str | None = None, limit: int = 100) -> AdapterPage:
        """One page, in name order; pass the page's `next_after` as `after` for the next."""
        return _page(self._client._json(_list_call(after, limit)))

    def iter(self, *, page_size: int = 100) -> Iterator[AdapterInfo]:
        """Every adapter, fetching page after page."""
        after = None
        while True:
            page = self.list(after=after, limit=page_size)
            yield from page.data
            if not page.has_more:
                return
            after = page.next_after

    def delete(self, name: str) -> None:
        self._client._send(_Call("DELETE", f"/v1/adapters/{name}"))


class Jobs:
    """`client.jobs`: the tenant's fine-tuning jobs."""

    def __init__(self, client: VBServeClient) -> None:
        self._client = client

    def create(
        self,
        training_file: bytes | str | os.PathLike[str],
        adapter: str,
        validation_file: bytes | str | os.PathLike[str] | None = None,
        **hyperparameters: Any,
    ) -> FineTuningJob:
        """Queue a job that trains on a JSONL file (bytes or a path) and publishes the
        adapter as the next version of `adapter`. Hyperparameters are the server's names:
        `target_modules`, `r`, `vector_length`, `num_vectors`, `topk`, `epochs`,
        `max_steps`, `batch_size`, `lr_bank`, `lr_logits`, `max_seq_len`, `seed`, ...
        A bad file or hyperparameter raises `InvalidRequestError` naming the field."""
        return _job(self._client._json(_create_job_call(training_file, adapter, validation_file, hyperparameters)))

    def list(self, *, limit: int = 20, after: str | None = None) -> JobPage:
        """The newest `limit` jobs; with `after` (the last id of a page), the next page."""
        return _job_page(self._client._json(_list_jobs_call(limit, after)))

    def get(self, job_id: str) -> FineTuningJob:
        return _job(self._client._json(_Call("GET", f"{_JOBS}/{job_id}")))

    def events(self, job_id: str) -> list[JobEvent]:
        """The job's progress events so far, oldest first."""
        return [_job_event(e) for e in self._client._json(_Call("GET", f"{_JOBS}/{job_id}/events"))["data"]]

    def follow(self, job_id: str) -> Iterator[JobEvent | FineTuningJob]:
        """Progress events as they come, and the job whenever its status changes (first
        as it is now, last as it ended); the iterator ends when the job has ended."""
        for chunk in self._client._sse(_follow_call(job_id)):
            yield _job_update(chunk)

    def cancel(self, job_id: str) -> FineTuningJob:
        """A queued job ends at once; a running one within a step (`cancel_requested`
        until then). Nothing is published. A job that already ended: `ConflictError`."""
        return _job(self._client._json(_Call("POST", f"{_JOBS}/{job_id}/cancel")))


# -- the asynchronous client -------------------------------------------------------------


class AsyncVBServeClient:
    """Asyncio client with the methods of `VBServeClient`. Use `async with`, or `await aclose()`."""

    def __init__(
        self, url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT
    ) -> None:
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, headers=_auth_headers(api_key))
        self.adapters = AsyncAdapters(self)
        self.jobs = AsyncJobs(self)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncVBServeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def generate(
        self, prompt: str, *, adapter: str | None = None, **options: Unpack[SamplingOptions]
    ) -> Completion:
        return _completion(await self._json(_completion_call(prompt, adapter, False, options)), chat=False)

    def stream(
        self, prompt: str, *, adapter: str | None = None, **options: Unpack[SamplingOptions]
    ) -> AsyncIterator[str]:
        return self._deltas(_completion_call(prompt, adapter, True, options), chat=False)

    async def chat(
        self, messages: list[dict[str, str]], *, adapter: str | None = None, **options: Unpack[SamplingOptions]
    ) -> Completion:
        return _completion(await self._json(_chat_call(messages, adapter, False, options)), chat=True)

    def chat_stream(
        self, messages: list[dict[str, str]], *, adapter: str | None = None, **options: Unpack[SamplingOptions]
    ) -> AsyncIterator[str]:
        return self._deltas(_chat_call(messages, adapter, True, options), chat=True)

    async def models(self) -> list[Model]:
        return _models(await self._json(_Call("GET", "/v1/models")))

    async def _send(self, call: _Call) -> httpx.Response:
        try:
            response = await self._http.request(call.method, call.path, **call.kwargs)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc
        _raise_for_status(response)
        return response

    async def _json(self, call: _Call) -> Any:
        return (await self._send(call)).json()

    async def _sse(self, call: _Call) -> AsyncIterator[dict[str, Any]]:
        try:
            async with aconnect_sse(self._http, call.method, call.path, **call.kwargs) as source:
                if not source.response.is_success:
                    await source.response.aread()
                    _raise_for_status(source.response)
                try:
                    async for event in source.aiter_sse():
                        if (chunk := _event_chunk(event)) is None:
                            return
                        yield chunk
                except SSEError as exc:
                    raise _not_an_event_stream(exc, source.response) from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc

    async def _deltas(self, call: _Call, chat: bool) -> AsyncIterator[str]:
        async for chunk in self._sse(call):
            if text := _delta(chunk, chat):
                yield text


class AsyncAdapters:
    def __init__(self, client: AsyncVBServeClient) -> None:
        self._client = client

    async def push(
        self, name: str, source: bytes | str | os.PathLike[str], *, expected_version: int | None = None
    ) -> AdapterInfo:
        return AdapterInfo(**await self._client._json(_push_call(name, source, expected_version)))

    async def pull(self, name: str, *, format: ExportFormat = "native", omit_bank: bool = False) -> bytes:
        return (await self._client._send(_pull_call(name, format, omit_bank))).content

    async def get(self, name: str) -> AdapterInfo:
        return AdapterInfo(**await self._client._json(_Call("GET", f"/v1/adapters/{name}")))

    async def list(self, *, after: str | None = None, limit: int = 100) -> AdapterPage:
        return _page(await self._client._json(_list_call(after, limit)))

    async def iter(self, *, page_size: int = 100) -> AsyncIterator[AdapterInfo]:
        after = None
        while True:
            page = await self.list(after=after, limit=page_size)
            for item in page.data:
                yield item
            if not page.has_more:
                return
            after = page.next_after

    async def delete(self, name: str) -> None:
        await self._client._send(_Call("DELETE", f"/v1/adapters/{name}"))


class AsyncJobs:
    def __init__(self, client: AsyncVBServeClient) -> None:
        self._client = client

    async def create(
        self,
        training_file: bytes | str | os.PathLike[str],
        adapter: str,
        validation_file: bytes | str | os.PathLike[str] | None = None,
        **hyperparameters: Any,
    ) -> FineTuningJob:
        call = _create_job_call(training_file, adapter, validation_file, hyperparameters)
        return _job(await self._client._json(call))

    async def list(self, *, limit: int = 20, after: str | None = None) -> JobPage:
        return _job_page(await self._client._json(_list_jobs_call(limit, after)))

    async def get(self, job_id: str) -> FineTuningJob:
        return _job(await self._client._json(_Call("GET", f"{_JOBS}/{job_id}")))

    async def events(self, job_id: str) -> list[JobEvent]:
        body = await self._client._json(_Call("GET", f"{_JOBS}/{job_id}/events"))
        return [_job_event(e) for e in body["data"]]

    async def follow(self, job_id: str) -> AsyncIterator[JobEvent | FineTuningJob]:
        async for chunk in self._client._sse(_follow_call(job_id)):
            yield _job_update(chunk)

    async def cancel(self, job_id: str) -> FineTuningJob:
        return _job(await self._client._json(_Call("POST", f"{_JOBS}/{job_id}/cancel")))
