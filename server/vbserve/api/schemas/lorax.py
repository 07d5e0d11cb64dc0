"""The LoRAX/TGI-compatible bodies: TGI's `inputs` + `parameters`, as `lorax-client` sends them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from vbserve.engine import InvalidRequestError, MixtureComponent, MixtureRef, ResponseFormat

from .common import Text, not_supported

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
