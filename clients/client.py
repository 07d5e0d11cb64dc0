"""Python client for a vbserve server, on httpx alone (no torch, nothing of the server).

    from clients import VBServeClient

    with VBServeClient("http://127.0.0.1:8000") as vb:
        vb.adapters.push("support-bot", "checkpoints/support-bot")  # a PEFT VB-LoRA dir
        print(vb.generate("Hello", adapter="support-bot", max_tokens=32).text)
        for delta in vb.stream("Tell me a story", adapter="support-bot"):
            print(delta, end="", flush=True)

`AsyncVBServeClient` has the same methods as coroutines and async iterators. Errors are
raised as the `APIError` subclass that the server's error `type` names.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
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


class OverloadedError(APIError):
    """The server's queue is full; retry after `retry_after` seconds."""

    retry_after: float | None = None


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
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "too_large": TooLargeError,
    "overloaded": OverloadedError,
    "unavailable": UnavailableError,
    "internal_error": InternalServerError,
}
_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequestError,
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
    if isinstance(exc, OverloadedError | UnavailableError) and retry_after:
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


_DONE = object()  # the `data: [DONE]` event


def _sse_chunk(line: str) -> dict[str, Any] | object | None:
    """The JSON of one SSE `data:` line, `_DONE` at the end, None for other lines.
    An error event (a failure after streaming began) is raised."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    chunk = json.loads(data)
    if "error" in chunk:
        raise error_from_body(chunk, None)
    return chunk


def _delta(chunk: dict[str, Any], chat: bool) -> str:
    if not chunk.get("choices"):  # e.g. the usage chunk
        return ""
    choice = chunk["choices"][0]
    return ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""


def _push_call(name: str, source: bytes | str | os.PathLike[str], expected_version: int | None) -> _Call:
    """bytes or a file: our adapter blob; a directory: a PEFT VB-LoRA checkpoint."""
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


# -- the synchronous client --------------------------------------------------------------


class VBServeClient:
    """Blocking client. Use as a context manager, or call `close()`."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        self._http = httpx.Client(base_url=url, timeout=timeout)
        self.adapters = Adapters(self)

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

    def _deltas(self, call: _Call, chat: bool) -> Iterator[str]:
        try:
            with self._http.stream(call.method, call.path, **call.kwargs) as response:
                if not response.is_success:
                    response.read()
                    _raise_for_status(response)
                for line in response.iter_lines():
                    chunk = _sse_chunk(line)
                    if chunk is _DONE:
                        return
                    if text := _delta(chunk, chat) if isinstance(chunk, dict) else "":
                        yield text
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc


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


# -- the asynchronous client -------------------------------------------------------------


class AsyncVBServeClient:
    """Asyncio client with the methods of `VBServeClient`. Use `async with`, or `await aclose()`."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT) -> None:
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout)
        self.adapters = AsyncAdapters(self)

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

    async def _deltas(self, call: _Call, chat: bool) -> AsyncIterator[str]:
        try:
            async with self._http.stream(call.method, call.path, **call.kwargs) as response:
                if not response.is_success:
                    await response.aread()
                    _raise_for_status(response)
                async for line in response.aiter_lines():
                    chunk = _sse_chunk(line)
                    if chunk is _DONE:
                        return
                    if text := _delta(chunk, chat) if isinstance(chunk, dict) else "":
                        yield text
        except httpx.TransportError as exc:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc


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
