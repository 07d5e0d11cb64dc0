"""The HTTP contract: request and response bodies.

OpenAI-compatible bodies follow OpenAI's field names and shapes (so the official `openai`
package works against us) plus two non-OpenAI sampling fields, `top_k` and
`repetition_penalty`. LoRAX/TGI bodies follow TGI's `inputs` + `parameters`.

No field is silently ignored: an answer that dropped `logit_bias` or `response_format`
would look right and not be. A field this server does not know is a 400 naming it
(pydantic's `extra="forbid"`); a known field set to a value this server does not
implement is a 400 naming it too (`not_supported`); `errors.py` maps both. The only
fields accepted and ignored are the OpenAI ones that change nothing here (`user`,
`metadata`, `store`, `service_tier`).

Types are checked here (a wrong type is a 422); value ranges are the engine's
(`SamplingParams.validate`), checked once there and reported as a 400.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from server.engine import InvalidRequestError, MixtureComponent, MixtureRef, ResponseFormat


def _unicode(value: str) -> str:
    """JSON's `\\ud800` escapes can carry lone surrogates, which are not text: no tokenizer
    encodes them (they reached the tokenizer and failed there with a 500)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (\\ud800-\\udfff): not valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]

# The pydantic error type of a known field set to a value this server does not implement
# (errors.py answers it, like an unknown field, with a 400 naming the field).
NOT_SUPPORTED = "not_supported"


def not_supported(why: str) -> PydanticCustomError:
    return PydanticCustomError(NOT_SUPPORTED, why)


# -- OpenAI: completions and chat ----------------------------------------------------------


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


# -- LoRAX / TGI ---------------------------------------------------------------------------


# Parameters that `lorax-client` sends (each with its default unless the caller sets it)
# and this server does not implement: a value other than these defaults is a 400 naming
# the parameter, why, and what to do instead.
_REFUSED_PARAMETERS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "decoder_input_details": (lambda v: v, "prompt token logprobs (decoder_input_details) are not implemented"),
    "typical_p": (lambda v: v is not None, "typical decoding (typical_p) is not implemented; use top_p or top_k"),
    "watermark": (lambda v: v, "watermarking is not implemented"),
    "adapter_source": (
        lambda v: v is not None,
        "adapters come from this server's own store (upload with PUT /v1/adapters/{name}); leave adapter_source unset",
    ),
    "api_token": (
        lambda v: v is not None,
        "this server takes its API key in the Authorization header (`Authorization: Bearer <key>`; "
        "lorax.Client(url, headers=...)), not in the body",
    ),
}


class LoraxResponseFormat(BaseModel):
    """LoRAX's `parameters.response_format` (lorax-client's `ResponseFormat`): the output is
    JSON matching `schema` (`{"type": "object"}`: any object)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_object"]
    schema_: dict[str, Any] = Field(..., alias="schema", description="The JSON Schema the output must match")

    def output_format(self) -> ResponseFormat:
        return ResponseFormat(self.schema_, field="parameters.response_format.schema")


class MergedAdapters(BaseModel):
    """LoRAX's per-request merge, as `lorax-client`'s `MergedAdapters` sends it. Values
    are checked by the engine (a 400 naming e.g. `parameters.merged_adapters.weights[1]`)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Any] = Field(..., description="Adapter names (yours)")
    weights: list[Any] = Field(..., description="One non-zero weight in [-100, 100] per id")
    merge_strategy: str | None = Field(
        None,
        description='"linear" (the default) or "cat": PEFT\'s add_weighted_adapter combination_type of that name',
    )
    density: float = Field(1.0, ge=0, le=1, description="Used by ties/dare strategies only; linear does not use it")
    majority_sign_method: Literal["total", "frequency"] | None = Field(
        None, description="Used by ties strategies only; linear does not use it"
    )

    def mixture(self, tenant: str) -> MixtureRef:
        """The mixture this merge asks for (`merge_strategy` names the PEFT combination)."""
        where = "parameters.merged_adapters"
        if len(self.weights) != len(self.ids):
            raise InvalidRequestError(f"{where}.weights", f"needs one weight per id ({len(self.ids)})")
        components = tuple(
            MixtureComponent(name, weight, f"{where}.ids[{i}]", f"{where}.weights[{i}]")
            for i, (name, weight) in enumerate(zip(self.ids, self.weights, strict=True))
        )
        strategy = self.merge_strategy or "linear"  # LoRAX's default
        return MixtureRef(tenant, components, strategy, field=where, combination_field=f"{where}.merge_strategy")


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    ignore_eos_token: bool = False
    return_full_text: bool = Field(False, description="Prepend the prompt to generated_text")
    truncate: int | None = Field(None, description="Keep only the last N prompt tokens")
    return_k_alternatives: int | None = Field(None, description="Each token's k most likely alternatives (0..20)")
    response_format: LoraxResponseFormat | None = Field(None, description="JSON output matching a schema")
    best_of: int | None = Field(
        None, description="Sample this many (with do_sample, not streamed), answer the likeliest (VBSERVE_MAX_N)"
    )
    # Not implemented: refused unless omitted or the default (see _REFUSED_PARAMETERS).
    decoder_input_details: bool = Field(False, description="Only false")
    typical_p: float | None = Field(None, description="Not supported")
    watermark: bool = Field(False, description="Only false")
    adapter_source: str | None = Field(None, description="Not supported: adapters come from this server's store")
    api_token: str | None = Field(None, description="Not supported: send `Authorization: Bearer <key>`")
    merged_adapters: MergedAdapters | None = Field(None, description="Several adapters merged for this request")

    @property
    def samples(self) -> int:
        """How many samples to draw: best_of, 1 when omitted."""
        return 1 if self.best_of is None else self.best_of

    @field_validator(*_REFUSED_PARAMETERS)
    @classmethod
    def _refuse_unimplemented(cls, value: Any, info: ValidationInfo) -> Any:
        refused, why = _REFUSED_PARAMETERS[info.field_name]
        if refused(value):
            raise not_supported(why)
        return value


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Text
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool | None = Field(None, description="On POST /: stream (as /generate_stream) or not (as /generate)")


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class GeneratedToken(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool
    alternative_tokens: list[AlternativeToken] | None = None


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class SequenceDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = Field(
        default_factory=list, description="Always empty: decoder_input_details is not supported"
    )
    tokens: list[GeneratedToken]


class BestOfSequence(SequenceDetails):
    """One of best_of's other samples (TGI's shape)."""

    generated_text: str


class GenerateDetails(SequenceDetails):
    prompt_tokens: int
    best_of_sequences: list[BestOfSequence] | None = Field(None, description="best_of's other samples, likeliest first")


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    prompt_tokens: int
    seed: int | None


class GenerateStreamEvent(BaseModel):
    token: GeneratedToken
    generated_text: str | None = None
    details: StreamDetails | None = None


# -- adapters ------------------------------------------------------------------------------


class AdapterInfo(BaseModel):
    name: str
    version: int
    bank_id: str = Field(description='The vector bank\'s id; "" for a plain LoRA adapter (no bank)')
    config: dict[str, Any] = Field(description='The adapter\'s shape; a plain LoRA adapter\'s has "kind": "lora"')
    body_bytes: int = Field(description="Stored indices + weights + metadata (a plain LoRA adapter: its whole blob)")
    bank_bytes: int = Field(description="Stored vector bank (shared by every adapter that uses it); 0 without one")
    stored_bytes: int
    created: float
    updated: float


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    has_more: bool
    next_after: str | None = Field(None, description="Pass as `after` to get the next page")


class ResidentAdapter(BaseModel):
    name: str
    version: int
    in_slot: bool = Field(description="A batch slot holds it now (it served a request recently)")


class ResidentAdapterList(BaseModel):
    """The caller's adapters composed in this replica's engine cache: a request for one of
    them starts without loading it. Each API replica has its own cache."""

    object: Literal["list"] = "list"
    data: list[ResidentAdapter]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
