"""Conversations remembered in memory: the chat translation continued turn after turn must be
exactly the one built in one go, and the cache must stay within its budgets of items and
bytes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from relay.engine.history import HistoryCache
from relay.providers.base import History
from relay.providers.chat_messages import ChatTranscript, build_messages


def message(role: str, text: str) -> dict[str, Any]:
    part = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": part, "text": text}]}


def call(call_id: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": "f", "arguments": "{}"}


CONVERSATION: list[dict[str, Any]] = [
    message("developer", "rules"),
    message("user", "hi"),
    {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "h"}]},
    message("assistant", "let me look"),
    call("c1"),
    call("c2"),
    {"type": "function_call_output", "call_id": "c1", "output": "one"},
    {
        "type": "function_call_output",
        "call_id": "c2",
        "output": [{"type": "input_text", "text": "2"}],
    },
    message("assistant", "done"),
    message("assistant", "anything else?"),
    message("user", "no"),
    call("c3"),
]


@pytest.mark.parametrize("split", range(len(CONVERSATION) + 1))
def test_a_continued_transcript_equals_one_built_at_once(split: int) -> None:
    whole = build_messages("be brief", CONVERSATION)
    first = ChatTranscript().extended(CONVERSATION[:split])
    continued = first.extended(CONVERSATION[split:])
    assert orjson.loads(continued.json("be brief")) == whole
    assert orjson.loads(first.json("be brief", CONVERSATION[split:])) == whole
    # `extended` leaves its source as it was: the history's translation is shared.
    assert orjson.loads(first.json(None)) == build_messages(None, CONVERSATION[:split])


def test_assistant_items_across_the_boundary_make_one_message() -> None:
    # The history ends with an answer; the next input starts with an assistant message.
    before = ChatTranscript().extended([message("user", "q"), message("assistant", "a")])
    messages = orjson.loads(before.json(None, [message("assistant", "b"), message("user", "r")]))
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "a\n\nb"


def test_derive_extends_the_parent_once() -> None:
    seen: list[int] = []

    def count(total: int, items: list[dict[str, Any]]) -> int:
        seen.append(len(items))
        return total + len(items)

    parent = History(CONVERSATION[:4])
    assert parent.derive("n", count, 0) == 4
    child = History(CONVERSATION[:10], parent=parent)
    assert child.derive("n", count, 0) == 10
    assert child.derive("n", count, 0) == 10
    assert seen == [4, 6]  # the child translated only its 6 new items, once
    orphan = History(CONVERSATION[:10])
    assert orphan.derive("n", count, 0) == 10 and seen[-1] == 10


def test_cache_evicts_least_recently_used_within_its_budget() -> None:
    cache = HistoryCache(max_items=10, max_bytes=1 << 30)
    for name in ("a", "b", "c"):
        cache.put("t", name, History(CONVERSATION[:4]))
    assert cache.get("t", "a") is None  # 12 items > 10: the oldest went
    assert cache.get("t", "b") is not None  # now the most recently used
    cache.put("t", "d", History(CONVERSATION[:4]))
    assert cache.get("t", "c") is None and cache.get("t", "b") is not None
    assert cache.get("other tenant", "b") is None
    cache.put("t", "huge", History(CONVERSATION))  # larger than the whole budget: not kept
    assert cache.get("t", "huge") is None and len(cache) == 2


def test_cache_of_zero_keeps_nothing() -> None:
    for cache in (HistoryCache(max_items=0, max_bytes=1 << 30), HistoryCache(10, max_bytes=0)):
        cache.put("t", "a", History([]))
        assert cache.get("t", "a") is None


def sized(nbytes: int) -> History:
    return History([message("user", "x" * nbytes)])


def test_cache_is_bounded_by_bytes() -> None:
    budget = 64 * 1024
    cache = HistoryCache(max_items=10_000, max_bytes=budget)
    # A history costs twice its JSON (the items and their translation).
    for index in range(100):
        cache.put("t", str(index), sized(2000))
        assert cache.held_bytes <= budget
    kept = [index for index in range(100) if cache.get("t", str(index)) is not None]
    assert kept == list(range(100 - len(kept), 100))  # the most recent ones
    assert len(kept) == budget // (2 * sized(2000).size())


def test_an_oversized_history_is_never_kept() -> None:
    budget = 64 * 1024
    cache = HistoryCache(max_items=10_000, max_bytes=budget)
    cache.put("t", "small", sized(100))
    # Over a quarter of the budget: kept, it would push out most else for one turn.
    cache.put("t", "huge", sized(budget // 8 + 100))
    assert cache.get("t", "huge") is None
    assert cache.get("t", "small") is not None
    assert cache.held_bytes == 2 * sized(100).size()


def test_a_history_read_from_storage_is_measured_once() -> None:
    history = History(CONVERSATION)
    assert history.size() == len(orjson.dumps(CONVERSATION))
    history.items = []  # measured already: the figure stays
    assert history.size() == len(orjson.dumps(CONVERSATION))
    assert History(CONVERSATION, nbytes=7).size() == 7
