"""OpenAI tool calling (`tools`, `tool_choice`) on `/v1/chat/completions`.

Only for a model whose chat template renders tools: `read_chat_template` looks, once, for
`tools` among the template's undeclared variables (jinja2's `meta`). Elsewhere `tools` is a
400 naming it.

`tool_choice` (OpenAI's default: `auto` when tools are given) picks how the calls come out:
- `none`: the tools are in the prompt, the output is plain text (vLLM does the same).
- `auto`: the model writes what it likes; calls in its own format are parsed out. Supported
  format: Hermes/Qwen's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, picked
  when the template's source spells `<tool_call>`. A template with another format refuses
  `auto` (400 naming `tool_choice`); `required` and named still work there.
- `required` and a named function: the output is constrained with the response_format
  grammar (as vLLM's guided decoding does), so it always parses, even from a random model:
  to a JSON array of `{"name", "arguments"}` calls of the given tools, or to the named
  function's arguments alone.

Each choice's text goes through a reader (`feed` as it streams, then `end`) that splits it
into content and call pieces; a non-streamed response feeds the whole text at once, so both
give the same calls.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2 import meta
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import _compile_jinja_template

from vbserve.engine import ResponseFormat

from .errors import APIError
from .schemas.openai import ChatMessage, ChatRequest, NamedToolChoice, ToolSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ChatTemplate:
    """What the tokenizer's chat template does with tools."""

    takes_tools: bool  # the template reads `tools`
    call_format: str | None  # "hermes", or None: `auto` cannot parse this model's calls


def read_chat_template(tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """Read from the template's source, as the tokenizer picks it when given tools (a
    tokenizer with several templates has a `tool_use` one)."""
    try:
        source = tokenizer.get_chat_template(tools=[])
        # Parsed in the environment transformers renders it in: a plain jinja2 one does not
        # know the `generation` and loop-control tags that Hub templates use.
        environment = _compile_jinja_template(source).environment
        takes_tools = "tools" in meta.find_undeclared_variables(environment.parse(source))
    except (ValueError, jinja2.TemplateError):  # no chat template, or one that cannot render anything
        return ChatTemplate(False, None)
    return ChatTemplate(takes_tools, "hermes" if takes_tools and OPEN in source else None)


# -- what one request asks for -------------------------------------------------------------


@dataclass
class CallDelta:
    """A piece of tool call `index`: its id and name come first, then its arguments."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


Piece = str | CallDelta  # a str: content text


class PlainText:
    """No tool calls (no tools, or `tool_choice` "none"): everything is content."""

    calls = 0

    def feed(self, text: str) -> list[Piece]:
        return _content(text)

    def end(self) -> list[Piece]:
        return []


def _content(text: str) -> list[Piece]:
    return [text] if text else []


class NamedCall:
    """A named `tool_choice`: the output is that function's arguments, streamed as they come."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        pieces: list[Piece] = [] if self.calls else [CallDelta(0, id=new_call_id(), name=self._name)]
        self.calls = 1
        return [*pieces, CallDelta(0, text)] if text else pieces

    def end(self) -> list[Piece]:
        return self.feed("")


class JsonCalls:
    """`tool_choice` "required": the grammar writes a JSON array of calls with fixed
    separators (xgrammar's, no free whitespace) and each call's keys in the schema's order,
    `[{"name": "f", "arguments": {...}}, ...]`, so each call's name is known as soon as it
    is written and its arguments stream as they come. Arguments cut short (by max_tokens)
    stay cut, as OpenAI returns them."""

    _HEAD = re.compile(r'(?:\[|\}, )\{"name": "([^"]*)", "arguments": ')

    def __init__(self) -> None:
        self._text = ""  # not read yet
        self._in_arguments = False
        self._depth = 0  # of objects and arrays, inside the arguments
        self._in_string = self._escaped = False
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        self._text += text
        pieces: list[Piece] = []
        while self._text:
            if not self._in_arguments:
                head = self._HEAD.match(self._text)
                if head is None:
                    return pieces  # the head is not complete yet (or this is the closing "}]")
                pieces.append(CallDelta(self.calls, id=new_call_id(), name=head.group(1)))
                self._text, self._in_arguments = self._text[head.end() :], True
            end = self._arguments_end()
            arguments, self._text = (self._text, "") if end is None else (self._text[:end], self._text[end:])
            pieces += [CallDelta(self.calls, arguments)] if arguments else []
            if end is not None:
                self._in_arguments = False
                self.calls += 1
        return pieces

    def end(self) -> list[Piece]:
        self.calls += self._in_arguments  # a call cut short is still a call
        self._in_arguments = False
        return []

    def _arguments_end(self) -> int | None:
        """Where the arguments' JSON value ends in the unread text (None: not in it),
        scanning strings and nesting from where the last feed left off."""
        for i, char in enumerate(self._text):
            if self._in_string:
                self._escaped, self._in_string = (False, True) if self._escaped else (char == "\\", char != '"')
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


class HermesCalls:
    """`tool_choice` "auto" for Hermes/Qwen templates: `<tool_call>{"name": .., "arguments":
    {..}}</tool_call>` blocks in the text are calls; the rest is content, streamed as it
    comes except a tail that may be the start of `<tool_call>`. A block that is not a call
    of one of `names` (bad JSON, unknown function) stays content, as the model wrote it.
    `at_most`: calls after that many are dropped (`parallel_tool_calls` false)."""

    def __init__(self, names: set[str], at_most: int | None) -> None:
        self._names = names
        self._at_most = at_most
        self._text = ""  # not sent yet
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        self._text += text
        pieces: list[Piece] = []
        while True:
            start = self._text.find(OPEN)
            if start < 0:
                # Hold back a tail that could still become "<tool_call>".
                keep = next((k for k in range(len(OPEN) - 1, 0, -1) if self._text.endswith(OPEN[:k])), 0)
                pieces += _content(self._text[: len(self._text) - keep])
                self._text = self._text[len(self._text) - keep :]
                return pieces
            pieces += _content(self._text[:start])
            self._text = self._text[start:]
            stop = self._text.find(CLOSE)
            if stop < 0:
                return pieces  # inside a call: wait for its end
            block, self._text = self._text[: stop + len(CLOSE)], self._text[stop + len(CLOSE) :]
            pieces += self._block(block)

    def end(self) -> list[Piece]:
        rest, self._text = self._text, ""
        return _content(rest)  # an unfinished call stays text

    def _block(self, block: str) -> list[Piece]:
        call = _hermes_call(block[len(OPEN) : -len(CLOSE)])
        if call is None or call[0] not in self._names:
            return _content(block)
        if self._at_most is not None and self.calls >= self._at_most:
            return []
        self.calls += 1
        return [CallDelta(self.calls - 1, id=new_call_id(), name=call[0]), CallDelta(self.calls - 1, call[1])]


def _hermes_call(text: str) -> tuple[str, str] | None:
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return call["name"], json.dumps(arguments, ensure_ascii=False)


Reader = PlainText | NamedCall | JsonCalls | HermesCalls


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolUse:
    """One request's tool calling: the tools as the template gets them, the grammar the
    output must follow (None: free text) and a reader for each choice."""

    tools: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None
    new_reader: Callable[[], Reader] = PlainText
    parameters: list[ResponseFormat] = field(default_factory=list)  # each tool's, to check


def plan(template: ChatTemplate, body: ChatRequest) -> ToolUse:
    """What `body` asks of tool calling, checked against the template; 400s name the field."""
    choice = body.tool_choice
    _check_messages(template, body.messages)
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError("invalid_request", "tool_choice needs tools", "tool_choice")
        return ToolUse()
    if not template.takes_tools:
        raise APIError(
            "invalid_request", "the base model's chat template does not render tools: tool calling is off", "tools"
        )
    for i, t in enumerate(body.tools):
        if t.function.parameters.get("type", "object") != "object":
            raise APIError(
                "invalid_request", 'must describe an object ("type": "object")', f"tools.{i}.function.parameters"
            )
    names = [t.function.name for t in body.tools]
    if len(set(names)) < len(names):
        raise APIError("invalid_request", "two tools have the same function name", "tools")
    use = ToolUse(
        tools=[t.model_dump(exclude_none=True) for t in body.tools],
        parameters=[
            ResponseFormat(_arguments_schema(t), bool(t.function.strict), field=f"tools.{i}.function.parameters")
            for i, t in enumerate(body.tools)
        ],
    )
    choice = "auto" if choice is None else choice
    if choice == "none":
        return use
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            "invalid_request", 'response_format needs tool_choice "none" when tools are given', "response_format"
        )
    at_most = None if body.parallel_tool_calls else 1
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError("invalid_request", f"no tool is named {choice.function.name!r}", "tool_choice")
        use.response_format = use.parameters[names.index(choice.function.name)]
        use.new_reader = lambda: NamedCall(choice.function.name)
    elif choice == "required":
        # One strict tool makes the whole array strict: output that follows a stricter
        # grammar still matches every tool's schema.
        strict = any(t.function.strict for t in body.tools)
        use.response_format = ResponseFormat(_calls_schema(body.tools, at_most), strict, "tools")
        use.new_reader = JsonCalls
    elif template.call_format == "hermes":
        use.new_reader = lambda: HermesCalls(set(names), at_most)
    else:
        raise APIError(
            "invalid_request",
            'this model\'s tool-call format cannot be parsed (supported: Hermes "<tool_call>"); '
            'use tool_choice "required" or a named function',
            "tool_choice",
        )
    return use


def _arguments_schema(tool: ToolSpec) -> dict[str, Any]:
    """A tool's parameters as the schema of its arguments: always an object. Clients send
    `"parameters": {}` for a function without arguments, and a schema without a type would
    let the grammar write `5` as the arguments, which no reader can split from what follows."""
    return {**tool.function.parameters, "type": "object"}


def _calls_schema(tools: list[ToolSpec], at_most: int | None) -> dict[str, Any]:
    """A JSON array of calls, each of one of `tools` with arguments that match its parameters."""
    call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": _arguments_schema(t)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
    }
    return {"type": "array", "items": call, "minItems": 1} | ({"maxItems": at_most} if at_most else {})


def _check_messages(template: ChatTemplate, messages: list[ChatMessage]) -> None:
    """A message's content is required, except an assistant's that carries tool calls;
    tool calls and tool results are only for a template that renders them."""
    for i, m in enumerate(messages):
        if m.tool_calls and m.role != "assistant":
            raise APIError("invalid_request", "only assistant messages carry tool_calls", f"messages.{i}.tool_calls")
        if (m.role == "tool") != (m.tool_call_id is not None):
            raise APIError(
                "invalid_request", "tool messages, and only they, need tool_call_id", f"messages.{i}.tool_call_id"
            )
        if m.content is None and not m.tool_calls:
            raise APIError("invalid_request", "content is required", f"messages.{i}.content")
        if (m.tool_calls or m.role == "tool") and not template.takes_tools:
            where = f"messages.{i}.tool_calls" if m.tool_calls else f"messages.{i}.role"
            raise APIError("invalid_request", "the base model's chat template does not render tool calls", where)
        for j, call in enumerate(m.tool_calls or []):
            arguments = _json_object(call.function.arguments)
            if arguments is None:
                raise APIError(
                    "invalid_request", "must be a JSON object's text", f"messages.{i}.tool_calls.{j}.function.arguments"
                )


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def template_message(m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it: "developer" is OpenAI's newer name for
    "system", which templates know; tool calls carry their arguments parsed, as Hugging
    Face's templates expect (`arguments | tojson`)."""
    message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
    if m.tool_calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": _json_object(c.function.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    return message
