"""The HTTP contract: request and response bodies.

OpenAI-compatible bodies follow OpenAI's field names and shapes (so the official `openai`
package works against us) plus two non-OpenAI sampling fields, `top_k` and
`repetition_penalty`. LoRAX/TGI bodies follow TGI's `inputs` + `parameters`. Unknown
fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.

Types are checked here (a wrong type is a 422); value ranges are the engine's
(`SamplingParams.validate`), checked once there and reported as a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field


def _unicode(value: str) -> str:
    """JSON's `\\ud800` escapes can carry lone surrogates, which are not text: no tokenizer
    encodes them (they reached the tokenizer and failed there with a 500)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (\\ud800-\\udfff): not valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]

# -- OpenAI: completions and chat ----------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Sampling fields that completions and chat share."""

    model: str | None = Field(None, description="An adapter name, or the base model's name (or omitted) for none")
    max_tokens: int | None = None
    temperature: float | None = Field(None, description="0 is greedy; omitted is 1.0, as in OpenAI")
    top_p: float | None = None
    seed: int | None = None
    stop: Text | list[Text] | None = None
    n: int = Field(1, description="Independent samples (choices), at most VBSERVE_MAX_N")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Not in OpenAI's API; common in OpenAI-compatible servers.
    top_k: int | None = Field(None, description="0 or omitted: off")
    repetition_penalty: float | None = None
    # OpenAI's, over the tokens generated so far.
    presence_penalty: float | None = Field(None, description="In [-2, 2]")
    frequency_penalty: float | None = Field(None, description="In [-2, 2]")
    logit_bias: dict[int, float] | None = Field(None, description="Token id -> bias in [-100, 100], at most 300")
    # vLLM's extras (the `openai` package sends them in `extra_body`).
    min_p: float | None = Field(None, description="In [0, 1]; 0 or omitted: off")
    min_tokens: int | None = Field(None, description="EOS and stop_token_ids are masked until this many tokens")
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text]
    logprobs: int | None = Field(None, description="Return this many most likely tokens per position (0..20)")
    echo: bool = Field(False, description="Prepend the prompt to each choice's text (not with logprobs)")


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="Newer OpenAI name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(None, description="For an adapter: the base model it runs on")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- LoRAX / TGI ---------------------------------------------------------------------------


class GenerateParameters(BaseModel):
    adapter_id: str | None = Field(None, description="Adapter name; omitted or empty: the base model")
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Text | list[Text] | None = None
    repetition_penalty: float | None = None
    do_sample: bool = False
    details: bool = False


class GenerateRequest(BaseModel):
    inputs: Text
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class GeneratedToken(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class GenerateDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    tokens: list[GeneratedToken]


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None


class GenerateStreamEvent(BaseModel):
    token: GeneratedToken
    generated_text: str | None = None
    details: StreamDetails | None = None


# -- adapters ------------------------------------------------------------------------------


class AdapterInfo(BaseModel):
    name: str
    version: int
    bank_id: str
    config: dict[str, Any]
    body_bytes: int = Field(description="Stored indices + weights + metadata")
    bank_bytes: int = Field(description="Stored vector bank (shared by every adapter that uses it)")
    stored_bytes: int
    created: float
    updated: float


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    has_more: bool
    next_after: str | None = Field(None, description="Pass as `after` to get the next page")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
