"""Stored responses: retrieve, delete, input_items, store=false, previous_response_id."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
from conformance import assert_valid_item, assert_valid_response

from relay.storage.sql import open_store


def create(http: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = http.post("/v1/responses", json={"model": "fake-text", **body})
    assert answer.status_code == 200, answer.text
    created: dict[str, Any] = answer.json()
    return created


def test_retrieve_returns_what_was_answered(client: openai.OpenAI, http: httpx.Client) -> None:
    created = create(http, input="keep me", metadata={"team": "a"}, instructions="Be brief.")
    stored = http.get(f"/v1/responses/{created['id']}").json()
    assert stored == created
    assert_valid_response(stored)
    sdk = client.responses.retrieve(created["id"])
    assert sdk.metadata == {"team": "a"} and sdk.instructions == "Be brief."


def test_store_false_is_never_retrievable(http: httpx.Client) -> None:
    created = create(http, input="forget me", store=False)
    assert created["store"] is False
    assert http.get(f"/v1/responses/{created['id']}").status_code == 404
    follow = http.post(
        "/v1/responses",
        json={"model": "fake-text", "input": "next", "previous_response_id": created["id"]},
    )
    assert follow.status_code == 400
    assert follow.json()["error"]["code"] == "previous_response_not_found"


def test_delete_is_soft_and_final(client: openai.OpenAI, http: httpx.Client) -> None:
    created = create(http, input="delete me")
    deleted = http.delete(f"/v1/responses/{created['id']}")
    assert deleted.json() == {"id": created["id"], "object": "response", "deleted": True}
    assert http.get(f"/v1/responses/{created['id']}").status_code == 404
    assert http.get(f"/v1/responses/{created['id']}/input_items").status_code == 404
    assert http.delete(f"/v1/responses/{created['id']}").status_code == 404
    follow = http.post(
        "/v1/responses",
        json={"model": "fake-text", "input": "x", "previous_response_id": created["id"]},
    )
    assert follow.json()["error"]["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created["id"])
    other = create(http, input="delete me with the SDK")
    client.responses.delete(other["id"])
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(other["id"])


def test_input_items_paginate(client: openai.OpenAI, http: httpx.Client) -> None:
    items = [{"role": "user", "content": f"message {n}"} for n in range(5)]
    created = create(http, input=items)
    everything = client.responses.input_items.list(created["id"], order="asc", limit=100)
    texts = [item.content[0].text for item in everything.data]  # type: ignore[union-attr]
    assert texts == [f"message {n}" for n in range(5)]
    for item in everything.data:
        assert_valid_item(item.model_dump(mode="json", exclude_unset=True))
    ids = [item.id for item in everything.data]
    newest = http.get(f"/v1/responses/{created['id']}/input_items", params={"limit": 2}).json()
    assert [item["id"] for item in newest["data"]] == ids[::-1][:2]
    assert newest["has_more"] is True
    assert (newest["first_id"], newest["last_id"]) == (ids[4], ids[3])
    following = http.get(
        f"/v1/responses/{created['id']}/input_items",
        params={"limit": 2, "after": newest["last_id"]},
    ).json()
    assert [item["id"] for item in following["data"]] == [ids[2], ids[1]]
    tail = http.get(
        f"/v1/responses/{created['id']}/input_items", params={"limit": 10, "after": ids[1]}
    ).json()
    assert [item["id"] for item in tail["data"]] == [ids[0]] and tail["has_more"] is False
    # The SDK's auto-pagination walks the same cursor.
    walked = [item.id for item in client.responses.input_items.list(created["id"], limit=2)]
    assert walked == ids[::-1]


def test_chain_carries_tool_calls_and_outputs(http: httpx.Client) -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    first = http.post(
        "/v1/responses", json={"model": "fake-tool_call", "input": "weather?", "tools": tools}
    ).json()
    call = first["output"][0]
    second = http.post(
        "/v1/responses",
        json={
            "model": "fake-text",
            "previous_response_id": first["id"],
            "input": [
                {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
            ],
        },
    )
    assert second.status_code == 200, second.text
    assert second.json()["previous_response_id"] == first["id"]
    listed = http.get(f"/v1/responses/{second.json()['id']}/input_items").json()
    assert [item["type"] for item in listed["data"]] == ["function_call_output"]


def test_a_chain_deleted_by_another_process_ends(http: httpx.Client, database_url: str) -> None:
    """Relay remembers recent conversations in memory; a delete made through another process
    (another worker, another server on the same database) must still end the chain."""
    first = create(http, input="one")
    second = create(http, input="two", previous_response_id=first["id"])
    create(http, input="three", previous_response_id=second["id"])  # the chain is remembered

    async def delete_elsewhere() -> bool:
        other = await open_store(database_url)
        try:
            return await other.delete_response("default", second["id"])
        finally:
            await other.close()

    assert asyncio.run(delete_elsewhere())
    follow = http.post(
        "/v1/responses",
        json={"model": "fake-text", "input": "four", "previous_response_id": second["id"]},
    )
    assert follow.status_code == 400
    assert follow.json()["error"]["code"] == "previous_response_not_found"
