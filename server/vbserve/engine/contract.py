"""The engine's API contract: what a request asks for, what it streams back, how it fails."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_TOP_LOGPROBS = 20

# Bounds of the sampling settings, from what the float32 sampler (`sampling.py`) can
# represent. A positive setting below the smallest normal float32 (about 1.2e-38) becomes 0
# there (1e-50) or a denormal with few bits left: a temperature of 0 would divide the row's
# logits by zero (NaN), a top_p of 0 would keep nothing. Refused, so what runs is what was asked.
MIN_POSITIVE_SETTING = torch.finfo(torch.float32).tiny
MAX_TEMPERATURE = 100.0
# A penalty p divides a seen token's positive logit by p and multiplies a negative one by
# p; bounded on both sides by the same factor, a finite logit grows at most tenfold, so it
# stays finite unless it was already within a tenth of float32's largest value.
MAX_REPETITION_PENALTY = 10.0
MIN_REPETITION_PENALTY = 1 / MAX_REPETITION_PENALTY
# OpenAI's ranges. A presence or frequency penalty subtracts at most 2 * (1 + the tokens
# generated) from a logit and a bias adds at most 100: far inside float32 for any context.
MAX_PRESENCE_FREQUENCY_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300


# Structured output (`grammar.ResponseFormat`) is defined beside the library that compiles it.
if TYPE_CHECKING:
    from .grammar import ResponseFormat


class EngineError(Exception):
    """A request the engine refuses or cannot finish. `kind` is stable for API error bodies."""

    kind = "engine_error"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidRequestError(EngineError):
    kind = "invalid_request"


class OverloadedError(EngineError):
    """The waiting queue is full; retry later."""

    kind = "overloaded"


class RequestFailedError(EngineError):
    """Generating this one request failed after it was admitted (its sampling or its
    detokenizing raised, or its distribution was not finite); the other requests of its batch
    went on. Its input passed `validate`, so this is the server's fault: a 500 (`engine`)."""


class AdapterUnavailableError(EngineError):
    """The adapter cannot be served: unknown, incompatible, or the store is down."""

    def __init__(self, field: str, message: str, kind: str) -> None:
        super().__init__(field, message)
        self.kind = kind


@dataclass(frozen=True)
class AdapterRef:
    tenant: str
    name: str


# What a mixture may hold: each component is composed and concatenated into one slot, and
# its total rank must fit the slot tables (`max_lora_rank`) anyway; 8 adapters is already
# more than any merging recipe we know of uses.
MAX_MIXTURE_ADAPTERS = 8
# PEFT accepts any weight (negative ones subtract an adapter); bounded so that a weight
# times an adapter's matrices stays far inside float16/bfloat16.
MAX_MIXTURE_WEIGHT = 100.0
# PEFT `add_weighted_adapter` combination types a mixture may use (see `server/vbserve/vblora/mixture.py`).
COMBINATIONS = ("cat", "linear")


@dataclass(frozen=True)
class MixtureComponent:
    """One adapter of a mixture, and how the caller's request spells its two fields (an
    error names the one at fault in the caller's own dialect)."""

    name: str
    weight: float
    name_field: str
    weight_field: str


@dataclass(frozen=True)
class MixtureRef:
    """Several of one tenant's adapters composed into one for a request, exactly as PEFT's
    `add_weighted_adapter(adapters, weights, combination_type=combination)` composes them.
    `field` names the whole mixture in the caller's request, `combination_field` its
    combination type."""

    tenant: str
    components: tuple[MixtureComponent, ...]
    combination: str = "cat"
    field: str = "adapters"
    combination_field: str = "adapters"

    @property
    def name(self) -> str:
        """A readable recipe, e.g. `sql*0.7+chat*0.3` (metrics and logs)."""
        return "+".join(f"{c.name}*{c.weight:g}" for c in self.components)

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field (no store access)."""
        if self.combination not in COMBINATIONS:
            raise InvalidRequestError(
                self.combination_field,
                f"must be one of {list(COMBINATIONS)} (the PEFT combination types this server implements), "
                f"got {self.combination!r}",
            )
        if not 1 <= len(self.components) <= MAX_MIXTURE_ADAPTERS:
            raise InvalidRequestError(self.field, f"must name 1 to {MAX_MIXTURE_ADAPTERS} adapters")
        seen: set[str] = set()
        for c in self.components:
            if not isinstance(c.name, str) or not c.name:
                raise InvalidRequestError(c.name_field, "must be an adapter name")
            if c.name in seen:
                raise InvalidRequestError(c.name_field, f"{c.name!r} is named twice; give it one weight")
            seen.add(c.name)
            w = c.weight
            # Compared, never converted: math.isfinite raises for an int past float range (a
            # 400-digit weight), and NaN fails the comparison.
            if isinstance(w, bool) or not isinstance(w, int | float) or not abs(w) <= MAX_MIXTURE_WEIGHT:
                raise InvalidRequestError(
                    c.weight_field, f"must be a non-zero number in [-{MAX_MIXTURE_WEIGHT:g}, {MAX_MIXTURE_WEIGHT:g}]"
                )
            if w == 0:
                raise InvalidRequestError(
                    c.weight_field, f"must be a non-zero number in [-{MAX_MIXTURE_WEIGHT:g}, {MAX_MIXTURE_WEIGHT:g}]"
                )


@dataclass
class SamplingParams:
    """Per-request decoding settings. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # OpenAI's penalties, over the tokens generated so far (not the prompt): a token's logit
    # loses presence_penalty once it was generated and frequency_penalty per time.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_p: float = 0.0  # vLLM's: drop tokens less likely than min_p x the top token's probability
    min_tokens: int = 0  # vLLM's: EOS and stop_token_ids are masked until this many tokens

    def validate(self, max_new_tokens_limit: int, vocab_size: int) -> None:
        """Raise InvalidRequestError naming the first bad field."""

        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(name, why)

        def number(name: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise bad(name, f"must be a finite number, got {value!r}")
            return float(value)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise bad("max_new_tokens", "must be an integer")
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise bad("max_new_tokens", f"must be in [1, {max_new_tokens_limit}], got {self.max_new_tokens}")
        temperature = number("temperature", self.temperature)
        if temperature != 0 and not MIN_POSITIVE_SETTING <= temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be 0 (greedy) or in [{MIN_POSITIVE_SETTING:.3g}, {MAX_TEMPERATURE:g}]")
        if not MIN_POSITIVE_SETTING <= number("top_p", self.top_p) <= 1:
            raise bad("top_p", f"must be in [{MIN_POSITIVE_SETTING:.3g}, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= vocab_size:
            raise bad("top_k", f"must be an integer in [0, {vocab_size}] (0 = off; the vocabulary has {vocab_size})")
        if (
            not MIN_REPETITION_PENALTY
            <= number("repetition_penalty", self.repetition_penalty)
            <= MAX_REPETITION_PENALTY
        ):
            raise bad("repetition_penalty", f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "must be an integer")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", "must be in [0, 2^63)")
        if not isinstance(self.stop, list) or len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"must be a list of at most {MAX_STOP_STRINGS} strings")
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_STRING_CHARS:
                raise bad("stop", f"each stop string must be 1..{MAX_STOP_STRING_CHARS} characters")
        if not isinstance(self.stop_token_ids, list) or len(self.stop_token_ids) > MAX_STOP_STRINGS:
            raise bad("stop_token_ids", f"must be a list of at most {MAX_STOP_STRINGS} token ids")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise bad("stop_token_ids", f"each id must be an integer in [0, {vocab_size})")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int):
            raise bad("top_logprobs", "must be an integer")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        limit = MAX_PRESENCE_FREQUENCY_PENALTY
        for name in ("presence_penalty", "frequency_penalty"):
            if not -limit <= number(name, getattr(self, name)) <= limit:
                raise bad(name, f"must be in [{-limit:g}, {limit:g}]")
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise bad("logit_bias", f"must map at most {MAX_LOGIT_BIAS_ENTRIES} token ids to biases")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise bad("logit_bias", f"token ids must be integers in [0, {vocab_size}), got {token!r}")
            if not -MAX_LOGIT_BIAS <= number("logit_bias", bias) <= MAX_LOGIT_BIAS:
                raise bad("logit_bias", f"each bias must be in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if not 0 <= number("min_p", self.min_p) <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int):
            raise bad("min_tokens", "must be an integer")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise bad("min_tokens", f"must be in [0, max_new_tokens ({self.max_new_tokens})]")


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: AdapterRef | MixtureRef | None = None
    timeout_s: float | None = None  # deadline from submission
    response_format: ResponseFormat | None = None  # None: free text
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class TokenEvent:
    """One generated token. `text` is the newly complete text (may be empty while a
    multi-byte character or a possible stop string is still pending)."""

    index: int
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class FinalResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # stop | length | cancelled | timeout | error
    usage: Usage
    adapter_version: int | None = None  # None: the base model, or a mixture
    time_to_first_token_s: float | None = None
    error: EngineError | None = None
