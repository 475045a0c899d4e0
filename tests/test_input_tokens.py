"""POST /v1/responses/input_tokens: what a would-be request costs, without generating it."""

from __future__ import annotations

import httpx
import openai
import pytest


def count(http: httpx.Client, **body: object) -> dict[str, object]:
    answer = http.post("/v1/responses/input_tokens", json=body)
    assert answer.status_code == 200, answer.text
    result: dict[str, object] = answer.json()
    assert result["object"] == "response.input_tokens"
    return result


def test_the_count_is_what_the_response_then_uses(http: httpx.Client) -> None:
    # The fake provider's tokens are words, exactly as its usage counts them.
    first = http.post("/v1/responses", json={"model": "fake-text", "input": "one two three"}).json()
    body = {"model": "fake-text", "input": "four five", "previous_response_id": first["id"]}
    counted = count(http, **body, instructions="be brief")
    assert counted["estimated"] is False
    created = http.post("/v1/responses", json={**body, "instructions": "be brief"}).json()
    assert counted["input_tokens"] == created["usage"]["input_tokens"]


def test_the_official_client_counts(client: openai.OpenAI) -> None:
    counted = client.responses.input_tokens.count(model="fake-text", input="a b c d")
    assert counted.input_tokens == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        (
            {"model": "fake-text", "input": "x", "previous_response_id": "resp_gone"},
            "previous_response_id",
        ),
        ({"model": "fake-text", "input": "x", "temperature": 9}, "temperature"),
    ],
)
def test_bad_counts_are_400s(http: httpx.Client, body: dict[str, object], param: str) -> None:
    answer = http.post("/v1/responses/input_tokens", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param
