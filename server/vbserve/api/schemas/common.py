"""What the bodies of several routers share: text that must be valid Unicode, and the
error type of a known field set to a value this server does not implement."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError


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
