"""The one parser for JSON a client sent: a blob's safetensors header and packed config, a
PEFT `adapter_config.json`, a training row, the `hyperparameters` form field.

Python's `json`, left alone, fails on hostile text with exceptions no caller expects, or
returns values JSON has no words for:
- nesting about 1000 deep raises RecursionError;
- an integer of more than 4300 digits raises a plain ValueError (the int-from-str limit);
- `NaN`, `Infinity` and `-Infinity` are accepted, and `1e999` becomes an infinite float.
Here each of these, like any syntax error, is a typed `FieldError` naming the field, which
the HTTP layer turns into a 400. The caller bounds the text's size first (each input has
its own limit and its own too-large error).
"""

from __future__ import annotations

import json
import math
import sys
from typing import NoReturn

from vbserve.backends import FieldError

from .errors import AdapterFormatError

# The deepest any accepted document goes is 4 (a chat row: row, messages, message, content);
# 32 leaves room for what may come and is far below the parser's recursion limit.
MAX_DEPTH = 32


class _NotJSON(ValueError):
    """A number JSON cannot hold, met while parsing."""


def load_untrusted_json(data: str | bytes, field: str, *, error: type[FieldError] = AdapterFormatError) -> object:
    """Parse `data` (bytes in UTF-8, -16 or -32, as `json.loads` reads them) or raise
    `error(field, reason)`."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NotJSON as exc:
        raise error(field, str(exc)) from None
    except json.JSONDecodeError as exc:
        where = f"column {exc.colno}" if exc.lineno == 1 else f"line {exc.lineno} column {exc.colno}"
        raise error(field, f"malformed JSON: {exc.msg} at {where}") from None
    except UnicodeDecodeError as exc:
        raise error(field, f"is not valid {exc.encoding} text (byte {exc.start})") from None
    except RecursionError:
        raise error(field, f"JSON nests deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # what is left is the int-from-str limit
        raise error(field, f"a number has more than {sys.get_int_max_str_digits()} digits") from None
    if _depth(value) > MAX_DEPTH:
        raise error(field, f"JSON nests deeper than {MAX_DEPTH} levels")
    return value


def _refuse_constant(name: str) -> NoReturn:
    raise _NotJSON(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJSON(f"the number {text[:32]} is too large for a 64-bit float")
    return value


def _depth(value: object) -> int:
    """How deep arrays and objects nest in a parsed document (a scalar is 0), walked
    without recursion."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:  # no need to look deeper than the limit
            pending.extend((child, depth + 1) for child in children)
    return deepest
