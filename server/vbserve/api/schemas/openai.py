"""The OpenAI-compatible bodies: completions, chat and models.

They follow OpenAI's field names and shapes (so the official `openai` package works
against us) plus two non-OpenAI sampling fields, `top_k` and `repetition_penalty`. The
only fields accepted and ignored are the OpenAI ones that change nothing here (`user`,
`metadata`, `store`, `service_tier`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vbserve.engine import MixtureComponent, MixtureRef, ResponseFormat

from .common import Text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(..., min_length=1, max_length=64, description="The schema's name (not used in generation)")
    description: str | None = Field(None, description="Not used in generation")
    schema_: dict[str, Any] = Field(..., alias="schema", description="The JSON Schema the output must match")
    strict: bool | None = Field(None, description="true: no properties beyond those the schema names")


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class OpenAIRequest(BaseModel):
    """What every OpenAI request body shares: the unknown-field policy (a 400 naming the
    field), the fields that change nothing here, and `response_format`."""

    model_config = ConfigDict(extra="forbid")

    # OpenAI's bookkeeping fields: they change nothing in the generated text.
    user: str | None = Field(None, description="Accepted and ignored")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored")
    store: bool | None = Field(None, description="Accepted and ignored")
    service_tier: str | None = Field(None, description="Accepted and ignored")
    response_format: Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")] | None = (
        Field(None, description="text (the default), json_object (any JSON object), or json_schema")
    )

    def output_format(self) -> ResponseFormat | None:
        """What the engine constrains the output to; None for free text."""
        match self.response_format:
            case JsonObjectFormat():
                return ResponseFormat()
            case JsonSchemaFormat(json_schema=spec):
                return ResponseFormat(spec.schema_, bool(spec.strict), field="response_format.json_schema.schema")
        return None


# OpenAI's rule for function names.
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_TOOLS = 128  # OpenAI's limit


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=FUNCTION_NAME)
    description: Text | None = None
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="A JSON Schema of the arguments object; omitted: no arguments",
    )
    strict: bool | None = Field(None, description="true: no argument properties beyond those the schema names")


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class ChatToolFields(BaseModel):
    """Tool calling, for a base model whose chat template renders tools (`tool_calls.py`)."""

    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='Omitted: "auto" with tools, "none" without'
    )
    parallel_tool_calls: bool = Field(True, description="false: at most one call")


class AdapterWeight(BaseModel):
    """One adapter of a per-request mixture. Values are checked by the engine (a 400 naming
    `adapters[i].name` or `adapters[i].weight`), so every bad value gets the same answer."""

    model_config = ConfigDict(extra="forbid")

    name: Any = Field(..., description="One of your adapters")
    weight: Any = Field(1.0, description="A non-zero number in [-100, 100]; negative subtracts the adapter")


class SamplingFields(OpenAIRequest):
    """Sampling fields that completions and chat share."""

    model: str | None = Field(
        None,
        description="An adapter name, or the base model's name (or omitted) for none; with `adapters`, "
        "the base model's name or omitted",
    )
    # vbserve's: a mixture of the caller's adapters (extra_body in the `openai` package).
    adapters: list[AdapterWeight] | None = Field(
        None,
        description="A per-request mixture: 1 to 8 of your adapters with weights, composed as PEFT's "
        'add_weighted_adapter(combination_type="cat") (README: Mixtures)',
    )
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

    def mixture(self, tenant: str) -> MixtureRef | None:
        """The mixture `adapters` asks for (PEFT's `cat`), or None."""
        if self.adapters is None:
            return None
        components = tuple(
            MixtureComponent(a.name, a.weight, f"adapters[{i}].name", f"adapters[{i}].weight")
            for i, a in enumerate(self.adapters)
        )
        return MixtureRef(tenant, components, "cat", field="adapters", combination_field="adapters")


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text]
    logprobs: int | None = Field(None, description="Return this many most likely tokens per position (0..20)")
    echo: bool = Field(False, description="Prepend the prompt to each choice's text (not with logprobs)")


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=FUNCTION_NAME)
    arguments: Text = Field(..., description="A JSON object's text")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # A message's `name` would change what the model should see: refused (a 400 naming
    # `messages.N.name`), not dropped. Which fields a role needs is checked with the
    # template in `tool_calls.plan`.
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's earlier calls")
    tool_call_id: str | None = Field(None, description="A tool message: the call it answers")

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields, ChatToolFields):
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
    content: str | None = Field(description="null when the answer is only tool calls")
    tool_calls: list[ToolCall] | None = None


# Omitted, not null, when unset: OpenAI's stream accumulator overwrites a call's `type` with
# every delta's (a null one included), which broke `openai`'s stream helpers.
_OMIT_NONE = Field(None, exclude_if=lambda value: value is None)


class FunctionDelta(BaseModel):
    name: str | None = _OMIT_NONE
    arguments: str = ""


class ToolCallDelta(BaseModel):
    """A streamed piece of a tool call: `id`, `type` and `name` on its first piece only."""

    index: int
    id: str | None = _OMIT_NONE
    type: Literal["function"] | None = _OMIT_NONE
    function: FunctionDelta


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
    tool_calls: list[ToolCallDelta] | None = None


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
