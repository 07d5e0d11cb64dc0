"""Training files: JSONL rows turned into token ids and loss labels, one line at a time.

Two row shapes are accepted, one per line:

    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

Loss is taken only on what the model should learn to write: the completion, or the last
assistant turn (earlier turns are context). Prompt tokens get the label -100, which
cross-entropy ignores.

Rows are tokenized exactly as the serving API tokenizes requests, so an adapter learns
the token sequence it will see at inference: a completion prompt is `tokenizer.encode(prompt)`
(the tokenizer's own special tokens, e.g. BOS, included); a chat prompt is the chat
template rendered up to the assistant's turn (`add_generation_prompt=True`) and encoded
without adding special tokens, the template writes them. A prompt/completion row gets the
EOS token after its completion, so the adapter learns to stop; a chat row's template
already ends the assistant turn with its own end token.

The file is read line by line with per-line, per-file and row-count limits checked as it
goes, so a file that claims billions of rows is refused after `max_rows + 1` of them, never
loaded whole. Every error is a `DatasetError` whose field names the file and line
(`training_file line 7`, `training_file line 7.messages[2].role`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

from transformers import PreTrainedTokenizerBase

from vbserve_store.untrusted_json import load_untrusted_json

from .errors import DatasetError, DatasetTooLargeError

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "developer", "user", "assistant")
Truncation = Literal["refuse", "truncate"]


@dataclass(frozen=True)
class Example:
    """One tokenized row. `labels[i]` is `input_ids[i]` where the loss counts, else -100
    (the model's forward shifts labels by one, as Hugging Face causal LMs do)."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class DatasetLimits:
    """How much one uploaded file may hold. The job queue keeps the file until the job
    ends, so these bound the queue's memory too."""

    max_bytes: int = 32 << 20
    max_rows: int = 100_000
    max_line_bytes: int = 1 << 20


def parse_jsonl(
    source: bytes | BinaryIO,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
    truncation: Truncation = "refuse",
    limits: DatasetLimits = DatasetLimits(),
    field: str = "training_file",
) -> list[Example]:
    """Parse and tokenize a JSONL training file.

    truncation: "refuse" raises on a row longer than `max_seq_len` tokens; "truncate"
    drops the oldest prompt tokens first (they matter least for what follows) and then,
    only if the completion alone is too long, the end of the completion.
    field: the name errors use for this file (`validation_file` for the held-out one).
    """
    if isinstance(source, bytes | bytearray):
        if len(source) > limits.max_bytes:
            raise DatasetTooLargeError(field, f"{len(source)} bytes exceed the limit of {limits.max_bytes}")
        source = io.BytesIO(source)
    examples = []
    for number, line in _lines(source, limits, field):
        where = f"{field} line {number}"
        row = _decode_row(line, where, first=number == 1)
        if row is None:
            continue
        if len(examples) >= limits.max_rows:
            raise DatasetTooLargeError(field, f"more than {limits.max_rows} rows")
        prompt_ids, completion_ids = _tokenize(row, tokenizer, where)
        examples.append(_fit(prompt_ids, completion_ids, max_seq_len, truncation, where))
    if not examples:
        raise DatasetError(field, "contains no rows")
    return examples


def _lines(stream: BinaryIO, limits: DatasetLimits, field: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line), refusing overlong lines and files as they stream."""
    total = 0
    number = 0
    while True:
        line = stream.readline(limits.max_line_bytes + 1)
        if not line:
            return
        number += 1
        total += len(line)
        if total > limits.max_bytes:
            raise DatasetTooLargeError(field, f"more than {limits.max_bytes} bytes")
        if len(line) > limits.max_line_bytes and not line.endswith(b"\n"):
            raise DatasetTooLargeError(f"{field} line {number}", f"longer than {limits.max_line_bytes} bytes")
        yield number, line


def _decode_row(line: bytes, where: str, *, first: bool) -> dict | None:
    """The row's JSON object, or None for a blank line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(where, f"is not valid UTF-8 (byte {exc.start})") from None
    if first:
        text = text.removeprefix("\ufeff")  # a BOM some editors write
    if not text.strip():
        return None
    row = load_untrusted_json(text, where, error=DatasetError)
    if not isinstance(row, dict):
        raise DatasetError(where, f"must be a JSON object, got {_json_type(row)}")
    return row


def _tokenize(row: dict, tokenizer: PreTrainedTokenizerBase, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a validated row."""
    if "messages" in row:
        if "prompt" in row or "completion" in row:
            raise DatasetError(where, "a row has either prompt/completion or messages, not both")
        return _tokenize_chat(row["messages"], tokenizer, f"{where}.messages")
    prompt = _text(row, "prompt", where)
    completion = _text(row, "completion", where)
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return tokenizer.encode(prompt), completion_ids


def _tokenize_chat(messages: object, tokenizer: PreTrainedTokenizerBase, where: str) -> tuple[list[int], list[int]]:
    if not isinstance(messages, list):
        raise DatasetError(where, f"must be a list, got {_json_type(messages)}")
    if len(messages) < 2:
        raise DatasetError(where, "needs at least one message before the assistant's answer")
    conversation = []
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise DatasetError(at, f"must be an object, got {_json_type(message)}")
        role = _text(message, "role", at)
        if role not in CHAT_ROLES:
            raise DatasetError(f"{at}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        conversation.append(
            {"role": "system" if role == "developer" else role, "content": _text(message, "content", at)}
        )
    if conversation[-1]["role"] != "assistant":
        raise DatasetError(f"{where}[{len(messages) - 1}].role", "the last message must be the assistant's answer")
    if not tokenizer.chat_template:
        raise DatasetError(where, "the base model has no chat template; use prompt/completion rows")
    try:
        prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception as exc:  # jinja raises its own TemplateError, or whatever the template raises
        raise DatasetError(where, f"the chat template refused the messages: {exc}") from None
    if not full.startswith(prompt):
        raise DatasetError(where, "the chat template does not render the answer after the prompt")
    return (
        tokenizer.encode(prompt, add_special_tokens=False),
        tokenizer.encode(full[len(prompt) :], add_special_tokens=False),
    )


def _fit(prompt: list[int], completion: list[int], max_seq_len: int, truncation: Truncation, where: str) -> Example:
    total = len(prompt) + len(completion)
    if total > max_seq_len:
        if truncation == "refuse":
            raise DatasetError(
                where, f"{total} tokens exceed max_seq_len {max_seq_len} (shorten it or set truncation='truncate')"
            )
        prompt = prompt[len(prompt) - max(1, max_seq_len - len(completion)) :]
        completion = completion[: max_seq_len - len(prompt)]
    return Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


def _text(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise DatasetError(where, f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where}.{key}", f"must be a string, got {_json_type(value)}")
    if not value:
        raise DatasetError(f"{where}.{key}", "must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
        raise DatasetError(
            f"{where}.{key}", "contains a lone surrogate (\\ud800-\\udfff): not valid Unicode text"
        ) from None
    return value


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
