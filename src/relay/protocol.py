"""The request side of the Responses API: every field of the seeds and the spec, validated.

Input items keep unknown keys (`extra="allow"`) because clients replay output items verbatim
(ids, status, annotations, logprobs, phase) and expect them back from input_items. The request
itself ignores unknown top-level fields, as clients such as Codex send their own.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from relay.errors import InvalidFields, InvalidRequest

MAX_INPUT_CHARS = 10_485_760
HOSTED_TOOL_TYPES = {
    "web_search",
    "web_search_2025_08_26",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "file_search",
    "code_interpreter",
    "computer_use_preview",
    "image_generation",
    "mcp",
    "local_shell",
    "shell",
    "apply_patch",
}

# Tool search (Codex's, OpenAI's): where the upstream searches for deferred tools itself (a
# Responses deployment whose hosted_tools lists "tool_search"), these items pass through;
# elsewhere every deferred tool is offered in full, a search the client runs is offered as a
# function whose call and output these items become, and one the server runs reaches the
# upstream not at all (relay.engine.checks.plan_tools, relay.providers.tool_names).
TOOL_SEARCH_ITEM_TYPES = frozenset({"tool_search_call", "tool_search_output"})

# Items of hosted tools an upstream ran (a Responses upstream's web search): given back as
# context, kept as they are; only a Responses upstream reads them (the others have their
# results in the answer's text).
HOSTED_ITEM_TYPES = frozenset(
    {
        "web_search_call",
        "file_search_call",
        "code_interpreter_call",
        "image_generation_call",
        "computer_call",
        "mcp_call",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
    }
)

ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


# strict=True: "stream": "yes" or "temperature": "0.5" are type errors, not coerced values.
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_DEPTH = 64
MAX_INPUT_ITEMS = 10_000
# Ids that clients send back (item ids, cursors, previous_response_id): printable ASCII, as
# every id Relay or OpenAI makes is; anything else cannot name a stored object.
ID_PATTERN = r"^[\x21-\x7e]{1,256}$"
ItemId = Annotated[str, Field(pattern=ID_PATTERN)]


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON nests deeper than `limit`: such bodies cannot be stored or forwarded."""
    stack = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(current, dict):
            stack.extend((child, depth + 1) for child in current.values())
        elif isinstance(current, list):
            stack.extend((child, depth + 1) for child in current)
    return False


def nul_field(value: Any, path: str = "") -> str | None:
    """The path (`models[1]`) of the first string in `value` holding a NUL character, or
    None. For bodies whose every string may become a column (PostgreSQL text cannot hold
    NUL); `value` nests at most MAX_DEPTH levels (json_object)."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        steps = [(f"{path}.{key}" if path else key, child) for key, child in value.items()]
    elif isinstance(value, list):
        steps = [(f"{path}[{index}]", child) for index, child in enumerate(value)]
    else:
        return None
    for step, child in steps:
        found = nul_field(child, step)
        if found is not None:
            return found
    return None


def invalid_request(error: ValidationError, data: Any, prefix: str = "") -> InvalidFields:
    """A pydantic error as the 400 clients get: the most specific message, the client's path;
    with every failure in FastAPI's shape beside it."""
    detail = deepest_error(error)
    param = error_param(data, tuple(detail["loc"]), prefix)
    code = "missing_required_parameter" if detail["type"] == "missing" else "invalid_value"
    message = detail["msg"].removeprefix("Value error, ")
    return InvalidFields(
        f"Invalid '{param}': {message}",
        param=param,
        code=code,
        details=fastapi_details(error, prefix),
    )


def fastapi_details(error: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    """Each failure as FastAPI lists a request-validation error: pydantic's own, located from
    `body` (`prefix` is where the validated part sits in the body, as `input[2]`)."""
    head = body_location(prefix)
    details = []
    for detail in error.errors(include_url=False):
        entry: dict[str, Any] = {
            "type": detail["type"],
            "loc": [*head, *detail["loc"]],
            "msg": detail["msg"],
            "input": detail["input"],
        }
        if "ctx" in detail:  # a ValueError a validator raised is given as its text
            entry["ctx"] = {key: _plain(value) for key, value in detail["ctx"].items()}
        details.append(entry)
    return details


_STEPS = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def body_location(path: str) -> list[str | int]:
    """A field's path as the client names it (`input[2].call_id`) as FastAPI locates it:
    ["body", "input", 2, "call_id"]."""
    return ["body", *(int(index) if index else name for index, name in _STEPS.findall(path))]


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | None) else str(value)


def deepest_error(error: ValidationError) -> ErrorDetails:
    """The most specific of pydantic's errors: for a union, the branch that got furthest."""
    return max(error.errors(), key=lambda detail: len(detail["loc"]))


def error_param(data: Any, loc: tuple[int | str, ...], prefix: str = "") -> str:
    """pydantic's error location as the path clients know (`input[0].content[1]`).

    pydantic puts union member names and discriminator tags in `loc`; walking the client's own
    data keeps only the steps that exist there.
    """
    path = prefix
    for step in loc:
        if isinstance(step, int) and isinstance(data, list) and step < len(data):
            path += f"[{step}]"
            data = data[step]
        elif isinstance(step, str) and isinstance(data, dict) and step in data:
            path += f".{step}" if path else step
            data = data[step]
        elif isinstance(step, str) and isinstance(data, dict) and not path:
            return step  # a missing top-level field: name it
    return path


# Content parts ---------------------------------------------------------------------------------


class InputText(_Open):
    type: Literal["input_text"]
    text: str


class InputImage(_Open):
    type: Literal["input_image"]
    image_url: str | None = Field(default=None, max_length=20_971_520)
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> InputImage:
        if not self.image_url and not self.file_id:
            raise ValueError("input_image needs image_url or file_id")
        return self


class InputFile(_Open):
    type: Literal["input_file"]
    filename: str | None = None
    file_data: str | None = Field(default=None, max_length=33_554_432)
    file_url: str | None = None
    file_id: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> InputFile:
        if not (self.file_data or self.file_url or self.file_id):
            raise ValueError("input_file needs file_data, file_url or file_id")
        return self


class OutputText(_Open):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)


class Refusal(_Open):
    type: Literal["refusal"]
    refusal: str


InputPart = Annotated[InputText | InputImage | InputFile, Field(discriminator="type")]
AssistantPart = Annotated[OutputText | Refusal | InputText, Field(discriminator="type")]


class SummaryText(_Open):
    type: Literal["summary_text"]
    text: str


class ReasoningText(_Open):
    type: Literal["reasoning_text"]
    text: str


# Input items -----------------------------------------------------------------------------------


class UserMessage(_Open):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer"]
    content: str | list[InputPart]
    id: ItemId | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class AssistantMessage(_Open):
    type: Literal["message"] = "message"
    role: Literal["assistant"]
    content: str | list[AssistantPart]
    id: ItemId | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCall(_Open):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=64)
    arguments: str
    id: ItemId | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutput(_Open):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=64)
    output: str | list[InputPart] = Field(union_mode="left_to_right")
    id: ItemId | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @field_validator("output")
    @classmethod
    def _bounded(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, str) and len(value) > MAX_INPUT_CHARS:
            raise ValueError(f"output is longer than {MAX_INPUT_CHARS} characters")
        return value


class Reasoning(_Open):
    type: Literal["reasoning"]
    id: ItemId | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class CustomToolCall(_Open):
    type: Literal["custom_tool_call"]
    call_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=64)
    input: str = Field(max_length=MAX_INPUT_CHARS)
    namespace: str | None = None
    id: ItemId | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class CustomToolCallOutput(FunctionCallOutput):
    type: Literal["custom_tool_call_output"]  # type: ignore[assignment]


class Compaction(_Open):
    """A compaction item from POST /responses/compact, given back as input."""

    type: Literal["compaction"]
    id: ItemId | None = None
    encrypted_content: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)


class ToolSearchCall(_Open):
    """A search for deferred tools (`tool_search`), by the upstream or by the client (Codex
    runs its own): given back as context."""

    type: Literal["tool_search_call"]
    arguments: Any
    call_id: str | None = Field(default=None, min_length=1, max_length=64)
    execution: Literal["server", "client"] | None = None
    id: ItemId | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class ToolSearchOutput(_Open):
    """The tools a search loaded: from then on the model may call them."""

    type: Literal["tool_search_output"]
    tools: list[dict[str, Any]] = Field(max_length=128)
    call_id: str | None = Field(default=None, min_length=1, max_length=64)
    execution: Literal["server", "client"] | None = None
    id: ItemId | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class HostedCall(_Open):
    type: str
    id: ItemId


class McpApprovalResponse(_Open):
    """The client's answer to an mcp_approval_request: the call runs (approve) or the model
    hears it was declined."""

    type: Literal["mcp_approval_response"]
    approval_request_id: str = Field(pattern=ID_PATTERN)
    approve: bool
    reason: str | None = Field(default=None, max_length=10_000)
    id: ItemId | None = None


class ItemReference(_Open):
    type: Literal["item_reference"] = "item_reference"
    id: ItemId


_ITEM_MODELS: dict[str, type[BaseModel]] = {
    "function_call": FunctionCall,
    "function_call_output": FunctionCallOutput,
    "reasoning": Reasoning,
    "compaction": Compaction,
    "custom_tool_call": CustomToolCall,
    "custom_tool_call_output": CustomToolCallOutput,
    "item_reference": ItemReference,
    "tool_search_call": ToolSearchCall,
    "tool_search_output": ToolSearchOutput,
    **dict.fromkeys(HOSTED_ITEM_TYPES, HostedCall),
    "mcp_approval_response": McpApprovalResponse,
}


def parse_item(raw: Any) -> BaseModel:
    """Validate one input item, picking its model by `type` (and by role for messages).

    Picking by hand rather than with a pydantic union gives errors that name the one shape the
    client meant instead of a list of every shape that did not match.
    """
    if not isinstance(raw, dict):
        raise ValueError("each input item must be an object")
    kind = raw.get("type", "message")
    if not isinstance(kind, str):
        raise ValueError("an input item's type must be a string")
    if kind == "message":
        model: type[BaseModel] = AssistantMessage if raw.get("role") == "assistant" else UserMessage
    elif kind in _ITEM_MODELS:
        model = _ITEM_MODELS[kind]
    else:
        raise ValueError(f"input item type '{kind}' is not supported")
    return model.model_validate(raw)


# Tools and formats -----------------------------------------------------------------------------


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None  # found by tool search (see TOOL_SEARCH_ITEM_TYPES)


class CustomTool(_Strict):
    """A tool whose input is free text, optionally held to a grammar (lark or regex)."""

    type: Literal["custom"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    format: dict[str, Any] | None = None
    defer_loading: bool | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None or value.get("type") == "text":
            return value
        if value.get("type") != "grammar":
            raise ValueError("format.type must be 'text' or 'grammar'")
        if value.get("syntax") not in ("lark", "regex") or not isinstance(
            value.get("definition"), str
        ):
            raise ValueError("a grammar format needs syntax 'lark' or 'regex' and a definition")
        return value


class NamespaceTool(_Strict):
    """Function tools grouped under a namespace (Codex groups an MCP server's tools so)."""

    type: Literal["namespace"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    tools: list[dict[str, Any]] = Field(min_length=1, max_length=128)
    defer_loading: bool | None = None  # of all its functions


class ToolSearchTool(_Strict):
    """Search among deferred tools: run by the upstream (`server`) or by the client, which
    answers the model's tool_search_call with a tool_search_output (`client`, Codex)."""

    type: Literal["tool_search"]
    description: str | None = None
    execution: Literal["server", "client"] | None = None
    parameters: dict[str, Any] | None = None


class McpToolFilter(_Strict):
    """Which of an MCP server's tools a rule covers: by name, or the read-only ones (those
    whose annotations say readOnlyHint)."""

    tool_names: list[str] | None = Field(default=None, max_length=1000)
    read_only: bool | None = None


class McpApprovalFilter(_Strict):
    always: McpToolFilter | None = None
    never: McpToolFilter | None = None


class McpTool(_Strict):
    """A remote MCP server Relay connects to and runs for the model (relay.engine.server_tools).
    `authorization` and `headers` are secrets: used for this response's calls, never echoed
    or stored."""

    type: Literal["mcp"]
    server_label: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    server_url: str | None = Field(default=None, min_length=1, max_length=2048)
    server_description: str | None = Field(default=None, max_length=10_000)
    headers: dict[str, str] | None = None
    authorization: str | None = Field(default=None, max_length=10_000)
    allowed_tools: list[str] | McpToolFilter | None = None
    require_approval: Literal["always", "never"] | McpApprovalFilter | None = None
    # Accepted for the SDK's sake; tools are always listed, and called only by the model.
    defer_loading: bool | None = None
    allowed_callers: list[Literal["direct", "programmatic"]] | None = None
    connector_id: str | None = None
    tunnel_id: str | None = None


class WebSearchLocation(_Open):
    type: Literal["approximate"] | None = None
    country: str | None = Field(default=None, max_length=64)
    city: str | None = Field(default=None, max_length=256)
    region: str | None = Field(default=None, max_length=256)
    timezone: str | None = Field(default=None, max_length=256)


class WebSearchFilters(_Strict):
    allowed_domains: list[str] | None = Field(default=None, max_length=100)


class WebSearchTool(_Strict):
    """`web_search` and `web_search_preview` (and their dated names), run by Relay through the
    configured search backend (relay.tools.web_search)."""

    type: Literal[
        "web_search",
        "web_search_2025_08_26",
        "web_search_preview",
        "web_search_preview_2025_03_11",
    ]
    filters: WebSearchFilters | None = None
    search_context_size: Literal["low", "medium", "high"] | None = None
    user_location: WebSearchLocation | None = None
    external_web_access: bool | None = None
    search_content_types: list[Literal["text", "image"]] | None = None


class ImageGenerationTool(_Strict):
    """`image_generation`, run by Relay through the configured images endpoint
    (relay.tools.images) where no deployment of the model runs it itself. The fields OpenAI's
    images API takes go to the endpoint; editing (action "edit", a mask, input fidelity) is
    refused, since the endpoint only generates."""

    type: Literal["image_generation"]
    action: Literal["generate", "edit", "auto"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    complexity: Literal["low", "medium", "high"] | None = None
    frame_count: int | None = Field(default=None, ge=1, le=INT32_MAX)
    frame_duration_ms: int | None = Field(default=None, ge=1, le=INT32_MAX)
    input_fidelity: Literal["high", "low"] | None = None
    input_image_mask: dict[str, Any] | None = None
    model: str | None = Field(default=None, min_length=1, max_length=256)
    moderation: Literal["auto", "low"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    output_format: Literal["png", "webp", "jpeg", "gif", "svg"] | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto"] | None = None
    size: str | None = Field(default=None, pattern=r"^(auto|[1-9][0-9]{1,4}x[1-9][0-9]{1,4})$")
    svg: dict[str, Any] | None = None


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: str
    namespace: str | None = None  # for a function of a namespace tool


class CustomChoice(_Strict):
    type: Literal["custom"]
    name: str
    namespace: str | None = None


class AllowedTools(_Strict):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required", "none"] = "auto"
    tools: list[dict[str, Any]] = Field(min_length=1, max_length=128)

    def names(self) -> list[tuple[str | None, str]]:
        """(namespace or None, name) of each allowed function."""
        names = []
        for tool in self.tools:
            namespace = tool.get("namespace")
            if (
                tool.get("type") not in ("function", "custom")
                or not isinstance(tool.get("name"), str)
                or not isinstance(namespace, str | None)
            ):
                raise ValueError(
                    "allowed_tools.tools entries must be {type: function|custom, name, namespace?}"
                )
            names.append((namespace, tool["name"]))
        return names


ToolChoice = Literal["none", "auto", "required"] | FunctionChoice | CustomChoice | AllowedTools


class TextFormatText(_Strict):
    type: Literal["text"]


class TextFormatJsonObject(_Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(_Strict):
    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[
    TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")
]


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Strict):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed", "none"] | None = None
    # Accepted for compatibility with OpenAI's older name of `summary`.
    generate_summary: Literal["auto", "concise", "detailed", "none"] | None = None


class StreamOptions(_Strict):
    include_obfuscation: bool | None = None


class PromptReference(_Strict):
    """A stored prompt template of the project, by id, and the values of its variables
    (relay.engine.prompts); `version` None: the latest."""

    id: str = Field(pattern=ID_PATTERN)
    version: str | None = Field(default=None, max_length=64)
    variables: dict[str, str | InputPart] | None = None


# The request -----------------------------------------------------------------------------------


MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_SESSION_ID = 128


def _metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(f"metadata may hold at most {MAX_METADATA_PAIRS} pairs")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY:
            raise ValueError(
                f"metadata key '{key[:70]}' is longer than {MAX_METADATA_KEY} characters"
            )
        if "[" in key or "]" in key:
            raise ValueError(f"metadata key '{key}' must not contain brackets")
        if len(item) > MAX_METADATA_VALUE:
            raise ValueError(
                f"metadata value for '{key}' is longer than {MAX_METADATA_VALUE} characters"
            )
    return value


class ContextManagement(_Strict):
    """Compaction inside create (relay.engine.compaction): when the context the upstream would
    read passes `compact_threshold` tokens, it is compacted before the model's turn."""

    type: Literal["compaction"]
    compact_threshold: int | None = Field(default=None, ge=1000, le=10_000_000)


class CreateResponse(BaseModel):
    """POST /v1/responses. Unknown top-level fields are ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)

    model: str | None = Field(default=None, min_length=1)
    models: list[str] | None = Field(default=None, min_length=1)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1, le=INT32_MAX)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    reasoning_effort: ReasoningEffort | None = None
    max_output_tokens: int | None = Field(default=None, ge=16, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = Field(default=None, ge=-INT64_MAX - 1, le=INT64_MAX)
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=128)
    session_id: str | None = Field(default=None, max_length=MAX_SESSION_ID)
    safety_identifier: str | None = Field(default=None, max_length=64)
    prompt_cache_key: str | None = Field(default=None, max_length=64)
    truncation: Literal["auto", "disabled"] | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    previous_response_id: ItemId | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    service_tier: Literal["auto", "default", "flex", "priority", "scale"] | None = None
    trace: dict[str, Any] | None = None
    provider: dict[str, Any] | None = None
    plugins: list[dict[str, Any]] | None = None
    modalities: list[Literal["text", "image"]] | None = None
    image_config: dict[str, str | float] | None = None
    prompt: PromptReference | None = None
    background: bool | None = None
    context_management: list[ContextManagement] | None = Field(default=None, max_length=1)

    @field_validator("metadata")
    @classmethod
    def _valid_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _metadata(value)

    @field_validator("max_output_tokens", "top_k", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        # Seed 000 types these as doubles; accept 256.0 but not 256.5.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("input", "instructions")
    @classmethod
    def _bounded(cls, value: str | list[Any] | None) -> str | list[Any] | None:
        if isinstance(value, str) and len(value) > MAX_INPUT_CHARS:
            raise ValueError(f"longer than {MAX_INPUT_CHARS} characters")
        if isinstance(value, list) and len(value) > MAX_INPUT_ITEMS:
            raise ValueError(f"more than {MAX_INPUT_ITEMS} items")
        return value


def json_object(raw: bytes | str, what: str = "The request body") -> dict[str, Any]:
    """`raw` parsed as a JSON object, nesting at most MAX_DEPTH levels; else a 400."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(f"{what} is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"{what} must be a JSON object.")
    if too_deep(data):
        raise InvalidRequest(f"{what} nests deeper than {MAX_DEPTH} levels.")
    return data


def create_request(data: dict[str, Any]) -> CreateResponse:
    """A create body (already a JSON object) as a validated request; else a 400 naming the
    field."""
    try:
        return CreateResponse.model_validate(data)
    except ValidationError as error:
        raise invalid_request(error, data) from None
