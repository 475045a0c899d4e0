r"""Prompt templates: what a version holds, its `{{variable}}` placeholders, and how a
request's variables fill them in (relay.engine.prompts applies the result to a request).

A placeholder is `{{name}}`: a name of ASCII letters, digits and underscores, not starting
with a digit, at most 64 characters, with spaces or tabs allowed inside the braces
(`{{ name }}`). Names are case-sensitive. Any other `{{` is plain text (JSON, another
template language's syntax), and a backslash before a placeholder makes it plain text too
(`\{{name}}` is sent as `{{name}}`). Placeholders are read in the instructions, in a
message's string content and in the text of its `input_text` / `output_text` parts.

A version's variables are exactly the names its placeholders use, so no template can hold a
placeholder nothing fills: a request must give each of them, and only them. Values are put in
once and never read for placeholders themselves, so a value that holds `{{x}}` stays as it
is. A string value (or an `input_text` part, by its text) goes into the text where its
placeholder stands. An `input_image` or `input_file` value becomes a content part of its
own: the text around its placeholder is split into `input_text` parts before and after it
(text that is only whitespace is left out), so a placeholder that is a whole part's text, or
a message's whole content, is replaced by that part. Such parts can stand only in user,
system and developer messages: in the instructions or an assistant message they are a 400.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from relay.errors import InvalidRequest
from relay.protocol import MAX_INPUT_CHARS, AssistantPart, InputPart

# A version's content, as stored (JSON): enough for long system prompts and few-shot
# examples, small enough that every process can keep the versions it serves in memory.
MAX_TEMPLATE_BYTES = 1_048_576
MAX_MESSAGES = 1000
# An optional backslash (the escape), then the placeholder.
_PLACEHOLDER = re.compile(r"(\\?)\{\{[ \t]*([A-Za-z_][A-Za-z0-9_]{0,63})[ \t]*\}\}")
_TEXT_PARTS = ("input_text", "output_text")

Value = str | dict[str, Any]  # a variable's value: text, or an input_image/input_file part


class _UserMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer"]
    content: str | list[InputPart]


class _AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["message"] = "message"
    role: Literal["assistant"]
    content: str | list[AssistantPart]


TemplateMessage = Annotated[_UserMessage | _AssistantMessage, Field(discriminator="role")]


class TemplateContent(BaseModel):
    """A version's content, as the admin API and `relay admin` take it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    instructions: str | None = Field(default=None, max_length=MAX_INPUT_CHARS)
    messages: list[TemplateMessage] = Field(default_factory=list, max_length=MAX_MESSAGES)

    def stored(self) -> dict[str, Any]:
        return {
            "instructions": self.instructions or None,
            "messages": [
                message.model_dump(mode="json", exclude_none=True) for message in self.messages
            ],
        }


def _texts(content: Mapping[str, Any]) -> Iterator[str]:
    """Every text of a version's content that placeholders are read in."""
    if content["instructions"]:
        yield content["instructions"]
    for message in content["messages"]:
        if isinstance(message["content"], str):
            yield message["content"]
        else:
            yield from (part["text"] for part in message["content"] if part["type"] in _TEXT_PARTS)


def variables_of(content: Mapping[str, Any]) -> tuple[str, ...]:
    """The names a version's placeholders use, in the order they first appear."""
    found = (
        match.group(2)
        for text in _texts(content)
        for match in _PLACEHOLDER.finditer(text)
        if not match.group(1)
    )
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True, slots=True)
class Template:
    """One version of a template, as requests read it. Never changed once made (a cached
    version is shared by every request that renders it)."""

    prompt_id: str
    version: int
    content: Mapping[str, Any]  # TemplateContent.stored()
    variables: tuple[str, ...]
    size: int  # of its stored JSON

    @classmethod
    def from_json(cls, prompt_id: str, version: int, text: str) -> Template:
        content = orjson.loads(text)
        return cls(prompt_id, version, content, variables_of(content), len(text))


def _param(name: str) -> str:
    return f"prompt.variables.{name[:100]}"


def _values(template: Template, given: Mapping[str, Any]) -> dict[str, Value]:
    """The request's variables, checked against the version's: every one given, no other;
    `input_text` parts as their text."""
    wanted = set(template.variables)
    which = f"version {template.version} of prompt '{template.prompt_id}'"
    for name in given:
        if name not in wanted:
            uses = ", ".join(template.variables) or "no variables"
            raise InvalidRequest(
                f"Unknown prompt variable '{name[:100]}': {which} uses {uses}.",
                param=_param(name),
                code="unknown_parameter",
            )
    for name in template.variables:
        if name not in given:
            raise InvalidRequest(
                f"Missing prompt variable '{name}': {which} uses it.",
                param=_param(name),
                code="missing_required_parameter",
            )
    return {
        name: value["text"] if isinstance(value, dict) and value["type"] == "input_text" else value
        for name, value in given.items()
    }


def _filled(text: str, values: Mapping[str, Value]) -> list[str | tuple[str, dict[str, Any]]]:
    """`text` with its placeholders filled: runs of text, and (name, part) where a variable
    is a part, in order."""
    pieces: list[str | tuple[str, dict[str, Any]]] = []
    run: list[str] = []
    last = 0
    for match in _PLACEHOLDER.finditer(text):
        run.append(text[last : match.start()])
        last = match.end()
        if match.group(1):
            run.append(match.group(0)[1:])  # escaped: the placeholder as written
            continue
        name = match.group(2)
        value = values[name]
        if isinstance(value, str):
            run.append(value)
        else:
            pieces.append("".join(run))
            run = []
            pieces.append((name, value))
    run.append(text[last:])
    pieces.append("".join(run))
    return pieces


def _part_refused(name: str, part: dict[str, Any], where: str) -> InvalidRequest:
    return InvalidRequest(
        f"Prompt variable '{name}' is an {part['type']} part, which can stand only in a "
        f"user, system or developer message, not in {where}.",
        param=_param(name),
    )


def _text_only(text: str, values: Mapping[str, Value], where: str) -> str:
    pieces = _filled(text, values)
    for piece in pieces:
        if isinstance(piece, tuple):
            raise _part_refused(*piece, where)
    return "".join(piece for piece in pieces if isinstance(piece, str))


def _as_parts(pieces: list[str | tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [
        piece[1] if isinstance(piece, tuple) else {"type": "input_text", "text": piece}
        for piece in pieces
        if isinstance(piece, tuple) or piece.strip()
    ]


def _message(message: Mapping[str, Any], values: Mapping[str, Value]) -> dict[str, Any]:
    role = message["role"]
    content = message["content"]
    if role == "assistant":
        where = "an assistant message"
        if isinstance(content, str):
            filled: Any = _text_only(content, values, where)
        else:
            filled = [
                {**part, "text": _text_only(part["text"], values, where)}
                if part["type"] in _TEXT_PARTS
                else part
                for part in content
            ]
        return {"type": "message", "role": role, "content": filled}
    if isinstance(content, str):
        pieces = _filled(content, values)
        if len(pieces) == 1:  # no part among them
            return {"type": "message", "role": role, "content": pieces[0]}
        return {"type": "message", "role": role, "content": _as_parts(pieces)}
    parts: list[dict[str, Any]] = []
    for part in content:
        if part["type"] != "input_text":
            parts.append(part)
            continue
        pieces = _filled(part["text"], values)
        if len(pieces) == 1:
            parts.append({**part, "text": pieces[0]})
        else:
            parts += _as_parts(pieces)
    return {"type": "message", "role": role, "content": parts}


def render(template: Template, given: Mapping[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
    """The version's instructions and messages with the request's variables (`given`:
    strings, or input parts as JSON) filled in; a 400 naming the variable that is missing,
    unknown, or a part where only text can go. New objects: the template is not changed."""
    values = _values(template, given)
    instructions = template.content["instructions"]
    if instructions:
        instructions = _text_only(instructions, values, "the instructions")
    messages = [_message(message, values) for message in template.content["messages"]]
    return instructions, messages
