"""Conversations with the official openai client: the API, and responses continuing one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import openai
import pytest
from live_server import relay_server
from relay_fixtures import fake_routes, sdk_client
from sqlalchemy import update

from relay.config import Settings
from relay.engine.conversation import begin as begin_turn
from relay.engine.history import HistoryCache
from relay.errors import Conflict
from relay.providers import fake
from relay.storage.conversations import ConversationStore, HoldLost
from relay.storage.sql import SqlStore
from relay.storage.tables import conversations


@pytest.fixture(scope="module")
def url(database_url: str) -> Iterator[str]:
    with relay_server(Settings(database_url=database_url, routes=fake_routes())) as base_url:
        yield base_url


@pytest.fixture
def sdk(url: str) -> Iterator[openai.OpenAI]:
    with sdk_client(url) as client:
        yield client


def test_the_conversations_api(sdk: openai.OpenAI) -> None:
    created = sdk.conversations.create(
        items=[{"type": "message", "role": "user", "content": "first"}],
        metadata={"topic": "demo"},
    )
    assert created.id.startswith("conv_") and created.metadata == {"topic": "demo"}
    assert sdk.conversations.retrieve(created.id).created_at == created.created_at
    added = sdk.conversations.items.create(
        created.id,
        items=[
            {"type": "message", "role": "user", "content": "second"},
            {"type": "message", "role": "assistant", "content": "third"},
        ],
    )
    assert [item.type for item in added.data] == ["message", "message"]
    listed = sdk.conversations.items.list(created.id, order="asc")
    texts = [item.content[0].text for item in listed.data]  # type: ignore[union-attr]
    assert texts == ["first", "second", "third"]
    newest = sdk.conversations.items.list(created.id, limit=2)  # desc by default
    assert [item.id for item in newest.data] == [listed.data[2].id, listed.data[1].id]
    assert newest.has_more
    second = listed.data[1].id
    assert sdk.conversations.items.retrieve(second, conversation_id=created.id).id == second
    sdk.conversations.items.delete(second, conversation_id=created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.conversations.items.retrieve(second, conversation_id=created.id)
    updated = sdk.conversations.update(created.id, metadata={"topic": "other"})
    assert updated.metadata == {"topic": "other"}
    deleted = sdk.conversations.delete(created.id)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.conversations.retrieve(created.id)


def test_responses_continue_a_conversation(sdk: openai.OpenAI) -> None:
    conversation = sdk.conversations.create()
    first = sdk.responses.create(model="fake-text", input="one two", conversation=conversation.id)
    assert first.conversation is not None and first.conversation.id == conversation.id
    second = sdk.responses.create(
        model="fake-text", input="three", conversation={"id": conversation.id}
    )
    # The fake model counts the context's words as input tokens: the whole conversation.
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    items = sdk.conversations.items.list(conversation.id, order="asc").data
    roles = [(item.type, getattr(item, "role", None)) for item in items]
    assert roles == [("message", "user"), ("message", "assistant")] * 2
    assert items[1].id == first.output[0].id
    # A stream adds its items too; a failed response adds nothing.
    with sdk.responses.stream(model="fake-text", input="four", conversation=conversation.id) as s:
        s.get_final_response()
    sdk.responses.create(model="fake-error_after", input="five", conversation=conversation.id)
    assert len(sdk.conversations.items.list(conversation.id, limit=100).data) == 6


def test_conversation_rules(sdk: openai.OpenAI) -> None:
    conversation = sdk.conversations.create()
    earlier = sdk.responses.create(model="fake-text", input="x")
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.responses.create(
            model="fake-text",
            input="x",
            conversation=conversation.id,
            previous_response_id=earlier.id,
        )
    assert raised.value.param == "conversation"
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="fake-text", input="x", conversation="conv_" + "0" * 48)


def test_two_responses_racing_on_one_conversation(sdk: openai.OpenAI, url: str) -> None:
    """While a response runs on a conversation, a second one is a 409: the conversation's
    items never interleave."""
    conversation = sdk.conversations.create()
    done = threading.Event()

    def slow() -> None:
        with sdk_client(url) as other:
            other.responses.create(model="fake-slow", input="x", conversation=conversation.id)
        done.set()

    runner = threading.Thread(target=slow)
    runner.start()
    time.sleep(0.5)
    with pytest.raises(openai.ConflictError) as raised:
        sdk.responses.create(model="fake-text", input="y", conversation=conversation.id)
    assert raised.value.code == "conversation_locked"
    runner.join()
    assert sdk.responses.create(model="fake-text", input="y", conversation=conversation.id)
    assert len(sdk.conversations.items.list(conversation.id).data) == 4


def test_a_turn_longer_than_the_hold_keeps_it(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hold lasts a run lease and is renewed with the runs' leases: a turn that runs for
    four leases keeps its conversation (a second turn meanwhile is a 409) and appends its
    items."""
    monkeypatch.setattr(fake, "SLOW_WORDS", [f"word{n}" for n in range(20)])  # 4 s
    settings = Settings(
        database_url=database_url, routes=fake_routes(), run_lease_s=1, run_poll_s=0.2
    )
    with relay_server(settings) as base_url, sdk_client(base_url) as client:
        conversation = client.conversations.create()
        slow = client.responses.create(
            model="fake-slow", input="x", conversation=conversation.id, stream=True
        )
        events = iter(slow)
        next(events)  # response.created: the hold is taken
        time.sleep(3)  # past the unrenewed hold's expiry (1 s, in whole seconds: under 2 s)
        with pytest.raises(openai.ConflictError) as raised:
            client.responses.create(model="fake-text", input="y", conversation=conversation.id)
        assert raised.value.code == "conversation_locked"
        last = list(events)[-1]
        assert last.type == "response.completed"
        inputs = client.responses.input_items.list(last.response.id, order="asc").data
        items = client.conversations.items.list(conversation.id, order="asc").data
        assert [item.id for item in items] == [
            *(item.id for item in inputs),
            *(item.id for item in last.response.output),
        ]


async def _lapse(store: SqlStore, conversation_id: str) -> None:
    """The hold lapses, as when its process stalled past the lease without renewing it."""
    lapse = update(conversations).where(conversations.c.id == conversation_id)
    await store.db.write(lambda conn: conn.execute(lapse.values(active_until=0)))


async def test_a_stale_holder_changes_nothing(store: SqlStore) -> None:
    """A turn whose hold lapsed and was taken by another can neither release that hold nor
    append its items; the new holder's turn appends its own."""
    stale, fresh = ConversationStore(store.db, 30), ConversationStore(store.db, 30)
    await stale.create("t", "conv_a", {}, [])
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}
    assert await stale.hold("t", "conv_a", "hold_old") == 1
    await _lapse(store, "conv_a")
    assert await fresh.hold("t", "conv_a", "hold_new") == 1
    await stale.renew()  # no longer its hold: the renewal leaves it to the new turn
    with pytest.raises(HoldLost):
        await stale.release("conv_a", "hold_old", [{**item, "id": "msg_old"}])
    with pytest.raises(HoldLost):
        await stale.release("conv_a", "hold_old", None)
    with pytest.raises(Conflict):  # still the new turn's
        await stale.hold("t", "conv_a", "hold_other")
    assert await fresh.release("conv_a", "hold_new", [{**item, "id": "msg_new"}]) == 2
    assert [found["id"] for found in await fresh.items("conv_a")] == ["msg_new"]


async def test_a_turn_that_lost_its_hold_says_so(
    store: SqlStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The response of a turn whose hold was taken stays as it ended; its items are not
    appended, and a warning names it and its conversation."""
    stale, fresh = ConversationStore(store.db, 30), ConversationStore(store.db, 30)
    await stale.create("t", "conv_c", {}, [])
    turn = await begin_turn(stale, HistoryCache(100, 1 << 20), "t", "conv_c")
    await _lapse(store, "conv_c")
    await fresh.hold("t", "conv_c", "hold_new")
    response = {"id": "resp_1", "status": "completed", "output": []}
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}
    await turn.end(response, [{**item, "id": "msg_1"}], None)
    await turn.abandon()  # as quiet
    assert await fresh.items("conv_c") == []
    assert any(
        "resp_1" in record.getMessage()
        and "conv_c" in record.getMessage()
        and record.levelname == "WARNING"
        for record in caplog.records
    )
    assert response["status"] == "completed"


async def test_a_renewed_hold_outlives_its_expiry(store: SqlStore) -> None:
    """Renewal pushes a hold's expiry forward: past its first expiry it is still held."""
    holds = ConversationStore(store.db, 1)
    await holds.create("t", "conv_b", {}, [])
    await holds.hold("t", "conv_b", "hold_1")
    await _lapse(store, "conv_b")
    await holds.renew()
    with pytest.raises(Conflict):
        await ConversationStore(store.db, 1).hold("t", "conv_b", "hold_2")
    assert await holds.release("conv_b", "hold_1", None) == 1


def test_unknown_fields_are_refused(url: str) -> None:
    import httpx

    with httpx.Client(base_url=url) as http:
        conversation = http.post("/v1/conversations", json={}).json()["id"]
        for path, body in (
            ("/v1/conversations", {"metadata": {}, "title": "x"}),
            (f"/v1/conversations/{conversation}", {"metadata": {}, "name": "x"}),
            (f"/v1/conversations/{conversation}/items", {"items": [], "after": "x"}),
        ):
            answer = http.post(path, json=body)
            assert answer.status_code == 400, (path, answer.text)
            assert answer.json()["error"]["param"] in ("title", "name", "after")


def test_errors_in_items_name_items(sdk: openai.OpenAI) -> None:
    conversation = sdk.conversations.create()
    bad = [
        {"type": "message", "role": "user", "content": "fine"},
        {"type": "message", "role": "user", "content": 5},
    ]
    for create in (
        lambda: sdk.conversations.create(items=bad),
        lambda: sdk.conversations.items.create(conversation.id, items=bad),
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            create()
        assert raised.value.param == "items[1].content"
        assert "'items[1].content'" in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.conversations.items.create(conversation.id, items=[{"type": "nonsense"}])
    assert raised.value.param == "items[0]"
