"""Bad input: a clear 4xx in the OpenAI envelope, before any stream starts, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from relay_fixtures import fake_routes, relay_on_sqlite

TOOL = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
BAD_SCHEMAS: list[dict[str, Any]] = [
    {"type": "objekt"},
    {"type": "object", "properties": []},
    {"type": "object", "properties": {"city": {"type": "strin"}}},
    {"type": "object", "required": "city"},
    {"type": "integer", "minimum": "0"},
    {"$schema": 7, "type": "object"},
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "items": 1},
]

BAD_REQUESTS: list[tuple[dict[str, Any], int, str | None, str | None]] = [
    # (body, status, param, code)
    ({"input": "x"}, 400, "model", "missing_required_parameter"),
    ({"model": "fake-text"}, 400, "input", "missing_required_parameter"),
    # No input items and nothing to continue: nothing for the model to answer.
    ({"model": "fake-text", "input": []}, 400, "input", "missing_required_parameter"),
    ({"model": "no-such-model", "input": "x"}, 404, "model", "model_not_found"),
    ({"model": "fake-text", "models": ["nope"], "input": "x"}, 404, "models[0]", "model_not_found"),
    ({"model": "fake-text", "input": "x", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"model": "fake-text", "input": "x", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ({"model": "fake-text", "input": "x", "presence_penalty": -3}, 400, "presence_penalty", None),
    (
        {"model": "fake-text", "input": "x", "frequency_penalty": 2.1},
        400,
        "frequency_penalty",
        None,
    ),
    ({"model": "fake-text", "input": "x", "top_logprobs": 21}, 400, "top_logprobs", None),
    ({"model": "fake-text", "input": "x", "max_output_tokens": 15}, 400, "max_output_tokens", None),
    (
        {"model": "fake-text", "input": "x", "max_output_tokens": 20.5},
        400,
        "max_output_tokens",
        None,
    ),
    ({"model": "fake-text", "input": "x", "max_tool_calls": 0}, 400, "max_tool_calls", None),
    (
        {"model": "fake-text", "input": "x", "metadata": {f"k{i}": "v" for i in range(17)}},
        400,
        "metadata",
        None,
    ),
    ({"model": "fake-text", "input": "x", "metadata": {"k" * 65: "v"}}, 400, "metadata", None),
    ({"model": "fake-text", "input": "x", "metadata": {"a[b]": "v"}}, 400, "metadata", None),
    ({"model": "fake-text", "input": "x", "metadata": {"k": "v" * 513}}, 400, "metadata", None),
    ({"model": "fake-text", "input": "x", "user": "u" * 129}, 400, "user", None),
    ({"model": "fake-text", "input": "x", "session_id": "s" * 129}, 400, "session_id", None),
    ({"model": "fake-text", "input": "x", "truncation": "sometimes"}, 400, "truncation", None),
    ({"model": "fake-text", "input": "x", "service_tier": "gold"}, 400, "service_tier", None),
    (
        {"model": "fake-text", "input": "x", "reasoning": {"effort": "max"}},
        400,
        "reasoning.effort",
        None,
    ),
    (
        {
            "model": "fake-text",
            "input": "x",
            "reasoning_effort": "low",
            "reasoning": {"effort": "high"},
        },
        400,
        "reasoning_effort",
        None,
    ),
    (
        {"model": "fake-text", "input": "x", "text": {"format": {"type": "yaml"}}},
        400,
        "text.format",
        None,
    ),
    (
        {
            "model": "fake-text",
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "bad name!", "schema": {}}},
        },
        400,
        "text.format.name",
        None,
    ),
    (
        {
            "model": "fake-text",
            "input": "x",
            "tools": [TOOL, {"type": "namespace", "name": "crm", "description": "", "tools": []}],
        },
        400,
        "tools[1].tools",
        None,
    ),
    (
        {
            "model": "fake-text",
            "input": "x",
            "tools": [
                TOOL,
                {"type": "namespace", "name": "crm", "tools": [{"type": "web_search"}]},
            ],
        },
        400,
        "tools[1].tools[0].type",
        "unsupported_tool_type",
    ),
    (
        {
            "model": "fake-text",
            "input": "x",
            "tools": [
                {**TOOL, "name": "crm__lookup"},
                {"type": "namespace", "name": "crm", "tools": [TOOL]},
            ],
        },
        400,
        "tools",
        None,
    ),
    (
        {"model": "fake-text", "input": "x", "tools": [{"type": "function", "name": "bad name"}]},
        400,
        "tools[0].name",
        None,
    ),
    ({"model": "fake-text", "input": "x", "tools": [TOOL, TOOL]}, 400, "tools", None),
    ({"model": "fake-text", "input": "x", "tool_choice": "required"}, 400, "tool_choice", None),
    (
        {
            "model": "fake-text",
            "input": "x",
            "tools": [TOOL],
            "tool_choice": {"type": "function", "name": "other"},
        },
        400,
        "tool_choice.name",
        None,
    ),
    (
        {
            "model": "fake-text",
            "input": "x",
            "tools": [TOOL],
            "tool_choice": {
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "function", "name": "other"}],
            },
        },
        400,
        "tool_choice.tools",
        None,
    ),
    (
        {"model": "fake-text", "input": "x", "background": True, "store": False},
        400,
        "background",
        "invalid_value",
    ),
    (
        {"model": "fake-text", "input": "x", "conversation": "chat_1"},
        400,
        "conversation",
        "invalid_value",
    ),
    (
        {"model": "fake-text", "input": "x", "prompt": {"id": "pmpt_1"}},
        404,
        "prompt.id",
        "prompt_not_found",
    ),
    (
        {"model": "fake-text", "input": "x", "prompt": {"id": "pmpt_1", "version": 1}},
        400,
        "prompt.version",
        "invalid_value",
    ),
    ({"model": "fake-text", "input": "x", "prompt": "pmpt_1"}, 400, "prompt", "invalid_value"),
    (
        {"model": "fake-text", "input": "x", "provider": {"only": ["a"]}},
        400,
        "provider.only",
        "no_eligible_deployment",
    ),
    (
        {"model": "fake-text", "input": "x", "plugins": [{"id": "web"}]},
        400,
        "plugins",
        "unsupported_parameter",
    ),
    (
        {"model": "fake-text", "input": "x", "modalities": ["text", "image"]},
        400,
        "modalities",
        "unsupported_parameter",
    ),
    ({"model": "fake-text", "input": "x", "modalities": ["audio"]}, 400, "modalities[0]", None),
    ({"model": "fake-text", "input": "x", "include": ["everything"]}, 400, "include[0]", None),
    (
        {
            "model": "fake-text",
            "input": "x",
            "stream": False,
            "stream_options": {"include_obfuscation": False},
        },
        400,
        "stream_options",
        None,
    ),
    (
        {"model": "fake-text", "input": [{"type": "message", "role": "wizard", "content": "x"}]},
        400,
        "input[0].role",
        None,
    ),
    ({"model": "fake-text", "input": [{"type": "telepathy"}]}, 400, "input[0]", None),
    (
        {
            "model": "fake-text",
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_image"}]}],
        },
        400,
        "input[0].content[0]",
        None,
    ),
    (
        {
            "model": "fake-text",
            "input": [{"type": "function_call_output", "call_id": "call_x", "output": "42"}],
        },
        400,
        "input[0].call_id",
        None,
    ),
    (
        {"model": "fake-text", "input": [{"type": "item_reference", "id": "msg_missing"}]},
        400,
        "input[0].id",
        "item_not_found",
    ),
    (
        {"model": "fake-text", "input": "x", "previous_response_id": "resp_missing"},
        400,
        "previous_response_id",
        "previous_response_not_found",
    ),
    ({"model": "fake-text", "input": 42}, 400, "input", None),
    # Shapes that once reached code that could not take them (a 500).
    (
        {"model": "fake-text", "input": [{"type": [1], "role": "user", "content": "x"}]},
        400,
        "input[0]",
        None,
    ),
    (
        {"model": "fake-text", "input": "x", "max_output_tokens": 1e30},
        400,
        "max_output_tokens",
        None,
    ),
    ({"model": "fake-text", "input": "x", "top_k": 10**20}, 400, "top_k", None),
    ({"model": "fake-text", "input": "x", "seed": 2**64}, 400, "seed", None),
    (
        {"model": "fake-text", "input": [{"role": "user", "content": "x", "id": "msg_a\u0000b"}]},
        400,
        "input[0].id",
        None,
    ),
    (
        {"model": "fake-text", "input": [{"type": "item_reference", "id": "msg\u0000"}]},
        400,
        "input[0].id",
        None,
    ),
    (
        {"model": "fake-text", "input": "x", "previous_response_id": "resp_\u0000"},
        400,
        "previous_response_id",
        None,
    ),
    ({"model": "fake-text", "input": "x", "stream": "yes"}, 400, "stream", None),
    ({"model": "fake-text", "input": "x", "temperature": "0.5"}, 400, "temperature", None),
    (
        {"model": "fake-text", "input": [{"role": "user", "content": "x"}] * 10_001},
        400,
        "input",
        None,
    ),
    # Schemas that are not JSON Schema: the client's error, not an upstream's 502.
    *[
        (
            {
                "model": "fake-text",
                "input": "x",
                "tools": [TOOL, {**TOOL, "name": "b", "parameters": schema}],
            },
            400,
            "tools[1].parameters",
            "invalid_json_schema",
        )
        for schema in BAD_SCHEMAS
    ],
    *[
        (
            {
                "model": "fake-json",
                "input": "x",
                "text": {"format": {"type": "json_schema", "name": "a", "schema": schema}},
            },
            400,
            "text.format.schema",
            "invalid_json_schema",
        )
        for schema in BAD_SCHEMAS
    ],
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_REQUESTS)
def test_bad_request_is_a_clear_error(
    http: httpx.Client,
    body: dict[str, Any],
    status: int,
    param: str | None,
    code: str | None,
    stream: bool,
) -> None:
    if body.get("stream") == "yes":
        stream = body["stream"]
    answer = http.post("/v1/responses", json={"stream": stream, **body})
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    expected_type = {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert error["type"] == expected_type


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_body_that_is_not_a_json_object(http: httpx.Client, raw: bytes) -> None:
    answer = http.post("/v1/responses", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_retrieve_with_malformed_or_unknown_id(http: httpx.Client) -> None:
    malformed = http.get("/v1/responses/not-an-id")
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "invalid_response_id"
    for method in ("GET", "DELETE"):
        unknown = http.request(method, "/v1/responses/resp_doesnotexist")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "response_not_found"
    listed = http.get("/v1/responses/resp_doesnotexist/input_items")
    assert listed.status_code == 404


@pytest.mark.parametrize(
    "query",
    [
        {"limit": 0},
        {"limit": 101},
        {"limit": "\u00b2"},  # passes str.isdigit(), refused by int()
        {"limit": "9" * 5000},  # past int()'s digit limit
        {"after": "item_1\n"},  # a regex '$' alone would let the newline through
        {"order": "sideways"},
    ],
)
def test_input_items_query_is_validated(http: httpx.Client, query: dict[str, Any]) -> None:
    created = http.post("/v1/responses", json={"model": "fake-text", "input": "x"}).json()
    answer = http.get(f"/v1/responses/{created['id']}/input_items", params=query)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == next(iter(query))


def test_unknown_route_and_method_use_the_envelope(http: httpx.Client) -> None:
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = http.put("/v1/responses")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_deeply_nested_json_is_refused(http: httpx.Client) -> None:
    deep: Any = 1
    for _ in range(300):
        deep = {"a": deep}
    tool = {"type": "function", "name": "f", "parameters": deep}
    for stream in (False, True):
        answer = http.post(
            "/v1/responses",
            json={"model": "fake-text", "input": "x", "tools": [tool], "stream": stream},
        )
        assert answer.status_code == 400
        assert "nests deeper" in answer.json()["error"]["message"]


def test_ids_with_control_characters_are_refused_everywhere(http: httpx.Client) -> None:
    created = http.post("/v1/responses", json={"model": "fake-text", "input": "x"}).json()
    for cursor in ("after", "before"):
        answer = http.get(f"/v1/responses/{created['id']}/input_items", params={cursor: "\x00"})
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == cursor


def test_session_header_is_bounded(http: httpx.Client) -> None:
    answer = http.post(
        "/v1/responses",
        headers={"x-session-id": "s" * 129},
        json={"model": "fake-text", "input": "x"},
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "x-session-id"


def test_method_not_allowed_has_no_made_up_code(http: httpx.Client) -> None:
    wrong = http.put("/v1/responses")
    assert wrong.json()["error"]["code"] is None


def test_only_the_declared_methods_are_served(relay_url: str) -> None:
    """Starlette adds HEAD to GET routes; the API never served it. (A plain client: a HEAD
    answer has no body for check_answer to read.)"""
    for path in ("/healthz", "/v1/models", "/v1/responses/resp_anything"):
        assert httpx.head(relay_url + path).status_code == 405


def test_a_fallback_must_honour_the_request_too(http: httpx.Client) -> None:
    """The first choice forwards `plugins`; its fallback could not, so it is refused up front
    instead of answering from the fallback with the field dropped."""
    answer = http.post(
        "/v1/responses",
        json={"model": "fake-forwards-plugins", "input": "x", "plugins": [{"id": "web"}]},
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "plugins"
    assert "fake-text" in answer.json()["error"]["message"]


def test_validation_errors_in_fastapis_shape_where_set(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """For clients written against a platform that answers as FastAPI does: a body that fails
    validation is a 422 listing each failure from `body`; every other error keeps the
    envelope."""
    with (
        relay_on_sqlite(
            tmp_path_factory,
            "fastapi-errors",
            [*fake_routes(), {"model": "refused", "provider": "fake", "upstream_model": "none"}],
            error_format="fastapi",
        ) as url,
        httpx.Client(base_url=url) as http,
    ):
        answer = http.post(
            "/v1/responses", json={"model": "fake-text", "input": "x", "temperature": 2.5}
        )
        assert answer.status_code == 422
        assert answer.json() == {
            "detail": [
                {
                    "type": "less_than_equal",
                    "loc": ["body", "temperature"],
                    "msg": "Input should be less than or equal to 2",
                    "input": 2.5,
                    "ctx": {"le": 2.0},
                }
            ]
        }
        item = {"type": "function_call_output", "output": "x"}  # validated on its own
        user = {"role": "user", "content": "hi"}
        answer = http.post("/v1/responses", json={"model": "fake-text", "input": [user, item]})
        assert answer.status_code == 422
        assert answer.json()["detail"] == [
            {
                "type": "missing",
                "loc": ["body", "input", 1, "call_id"],
                "msg": "Field required",
                "input": item,
            }
        ]
        # Faults found past the schema, located at the field they name, or at the body.
        missing = http.post("/v1/responses", json={"input": "x"})
        assert missing.status_code == 422
        assert missing.json()["detail"] == [
            {
                "type": "missing_required_parameter",
                "loc": ["body", "model"],
                "msg": "Missing required parameter: 'model'.",
                "input": None,
            }
        ]
        broken = http.post(
            "/v1/responses", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert broken.status_code == 422
        [detail] = broken.json()["detail"]
        assert (detail["type"], detail["loc"]) == ("json_invalid", ["body"])
        # An upstream's refusal is not a fault of the request's fields: the envelope.
        refused = http.post("/v1/responses", json={"model": "refused", "input": "x"})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "upstream_invalid_request"
        unknown = http.post("/v1/responses", json={"model": "no-such-model", "input": "x"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
